"""Launching: turning cells into rank groups. The run configuration from the command line,
GPUs, the warm pool and the fork server, one cell's launch with its timeout and its verdict, and a
run under an outside launcher (torchrun, Slurm).
"""
