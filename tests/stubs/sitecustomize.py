"""Make package metadata lie, to test the stack check from outside (on PYTHONPATH).

``COMPAT_STUB_MISSING=peft,torch`` makes ``importlib.metadata.version`` say those are not
installed; ``COMPAT_STUB_VERSIONS=megatron-bridge=0.3.0`` reports other versions.
"""

import os
from importlib import metadata

_missing = {n for n in os.environ.get("COMPAT_STUB_MISSING", "").split(",") if n}
_versions = dict(kv.split("=", 1) for kv in os.environ.get("COMPAT_STUB_VERSIONS", "").split(",") if kv)
_real_version = metadata.version


def _version(name: str) -> str:
    if name in _missing:
        raise metadata.PackageNotFoundError(name)
    return _versions.get(name) or _real_version(name)


if _missing or _versions:
    metadata.version = _version
