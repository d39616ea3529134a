"""The GPUs of this machine, handed to rank groups: a group holds ``world_size`` distinct GPUs while it lives.

Tiny models leave room for several cells on one GPU (``COMPAT_CELLS_PER_GPU`` slots each), but
never two ranks of one group on one GPU (NCCL refuses them). A wait for GPUs is bounded: it first
asks the pool to give up idle groups, then gives up with a reason after ``timeout``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

__all__ = ["Devices", "NoGPUs", "gpus"]


class NoGPUs(Exception):
    """No GPUs came free in time (or there are too few on this machine)."""


class Devices:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self._free = list(ids)
        self._cv = threading.Condition()

    @property
    def distinct(self) -> int:
        return len(set(self.ids))

    def take(self, n: int, timeout: float, evict: Callable[[], bool] = lambda: False) -> list[int]:
        """``n`` distinct GPUs; idle groups are evicted (``evict``) before waiting on busy ones."""
        if n > self.distinct:
            raise NoGPUs(f"needs {n} GPUs, {self.distinct} visible here")
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                if len(set(self._free)) >= n:
                    taken = sorted(set(self._free))[:n]
                    for i in taken:
                        self._free.remove(i)
                    return taken
            if evict():
                continue
            with self._cv:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoGPUs(f"waited {timeout:.0f}s for {n} free GPUs (all {self.distinct} busy)")
                self._cv.wait(min(left, 1.0))

    def give(self, ids: list[int]) -> None:
        with self._cv:
            self._free = sorted(self._free + ids)
            self._cv.notify_all()


_devices: Devices | None = None
_devices_lock = threading.Lock()


def gpus() -> Devices:
    """This process's GPUs (imports torch once, only for the CUDA backend)."""
    global _devices
    with _devices_lock:
        if _devices is None:
            import torch

            slots = int(os.environ.get("COMPAT_CELLS_PER_GPU", "1"))
            _devices = Devices(list(range(torch.cuda.device_count())) * slots)
        return _devices
