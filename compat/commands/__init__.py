"""Commands: the subcommands of ``python -m compat`` (``compat/cli.py``, beside the pytest plugin
``compat/pytest_plugin.py``: both entry points stay where installed environments find them):
the gate, bench, fuzz; each parses its options and calls the layers below.
"""
