"""Declarations: what a cell is, as data. Families, adapter kinds, layouts, layer specs, cells,
matrices, expected outcomes and plugins by name, read and validated from TOML before any process
starts; nothing here imports torch or megatron, or anything of the rank that will run them.
"""
