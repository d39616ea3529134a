"""``python -m compat.rank.plugin_import BACKEND ROLES_JSON``: import the named plugins as a rank would.

The child process of :func:`compat.declare.plugins.check`: a rank's workarounds applied first (user code
that imports megatron needs them, and they are never applied in the caller), then each plugin
loaded; one ``error:`` line per plugin that cannot be. Rank-side, so that the configuration
module (``compat.declare.plugins``) imports nothing from the rank.
"""

from __future__ import annotations

import json
import sys

from compat.declare.plugins import PluginError, load_callable

__all__ = ["main"]


def main(backend: str, todo: dict[str, str]) -> int:
    from compat.rank import workarounds

    workarounds.apply(backend)
    for role, name in todo.items():
        try:
            load_callable(name, role)
        except PluginError as exc:
            print(f"error: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
