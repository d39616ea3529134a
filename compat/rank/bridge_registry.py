"""What the installed megatron-bridge registers, read in a child process.

Importing megatron.bridge needs the Transformer Engine workaround and takes seconds; a child
process keeps both out of the caller (the CLI, a pytest session).
"""

from __future__ import annotations

import json
import subprocess
import sys

__all__ = ["registered_architectures"]

_PROBE = """
import json
from compat.rank.workarounds import transformer_engine as te
if te.needed():
    te.apply()
from megatron.bridge import AutoBridge
print("ARCHS=" + json.dumps(AutoBridge.list_supported_models()))
"""


def registered_architectures(timeout: float = 180) -> list[str]:
    """HF architecture names with a registered bridge (``AutoBridge.list_supported_models``)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("ARCHS="):
            return json.loads(line.removeprefix("ARCHS="))
    raise RuntimeError(f"could not list the bridge's architectures:\n{proc.stderr[-3000:]}")
