"""Planted faults: the catalogue (``catalogue.py``), the wrappers that plant them (``tamper.py``:
check faults; ``disrupt.py``: run faults), the post-import hook (``hook.py``) and the ``plant/``
directory whose ``sitecustomize`` plants ``COMPAT_FAULT`` in every rank."""
