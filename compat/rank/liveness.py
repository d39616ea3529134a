"""Whether a process still exists: a rank's check on its launcher, the fork server's on its children.

Its own module, below both: the launcher side (``compat.launch.forkserver``) and the rank side
(``compat.rank.worker``) each need it, and neither may import the other for it.
"""

from __future__ import annotations

import os

__all__ = ["process_alive"]


def process_alive(pid: int) -> bool:
    """A process of this id exists (a zombie counts: it has not been reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
