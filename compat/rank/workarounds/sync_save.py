"""A synchronous dist-checkpoint save without the process its asynchronous writers need.

``megatron/core/dist_checkpointing/strategies/filesystem_async.py:52-66`` (megatron-core 0.19.2)
``get_write_results_queue`` starts a ``spawn`` multiprocessing Manager, a process that imports torch
(about 2 CPU-seconds on a CPU runner, 5 s of a cold GPU cell), for the results of writers that may run
in another process. A synchronous save (``strategies/torch.py:725-728``
``TorchDistSaveShardedStrategy.save``: ``AsyncRequest.execute_sync``, the harness's own saver and
verl's with ``async_save: False``) runs its writer in the rank itself, so while such a save runs the
results travel through an in-process queue. An asynchronous save keeps the Manager it needs.
Applied on every backend.
"""

from __future__ import annotations

import queue

__all__ = ["apply"]


def apply() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    save = TorchDistSaveShardedStrategy.save
    in_process: queue.Queue = queue.Queue()

    def save_in_process(self, sharded_state_dict, checkpoint_dir):  # type: ignore[no-untyped-def]
        manager_queue = filesystem_async.get_write_results_queue
        filesystem_async.get_write_results_queue = lambda mp_mode="spawn": in_process
        try:
            return save(self, sharded_state_dict, checkpoint_dir)
        finally:
            filesystem_async.get_write_results_queue = manager_queue

    TorchDistSaveShardedStrategy.save = save_in_process
