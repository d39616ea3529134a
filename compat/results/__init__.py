"""Results: one record per cell (``results.json`` in the contract's shape), the verdict that
reduces the ranks' records to a cell's status, and the skipped checks a record carries.
"""
