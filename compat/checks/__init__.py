"""Checks: what a finding is (a failed check, an unsupported cell, a problem with its upstream
file and line) and how a tensor, a set of weights or an adapter directory is judged. The bottom
layer: it imports nothing else of compat, so every layer above can say what it found the same way.
"""
