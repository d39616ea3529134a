"""The rank: what one process of a cell's rank group runs. The worker loop, the round trip and
its parts (model build through the bridge, adapter checkpoint, HF PEFT export, Megatron and peft
forwards), the harness's collectives, the backends and the workarounds applied before megatron loads.
"""
