"""Let megatron-core run on CPU processes (gloo), where it assumes CUDA.

Applied only by the CPU backend. Upstream code this answers (megatron-core 0.19.2):
- ``megatron/core/models/common/embeddings/rotary_pos_embedding.py:162`` moves ``inv_freq`` to
  ``torch.cuda.current_device()`` on the first forward: :func:`apply` makes the current device
  the CPU in this process.
- ``megatron/core/dist_checkpointing/strategies/filesystem_async.py:248`` calls
  ``torch.cuda.synchronize()`` after copying tensors to host memory when saving a dist
  checkpoint: with nothing on a GPU there is nothing to wait for, so it is a no-op here.
- ``megatron/core/tensor_parallel/random.py:229`` ``CudaRNGStatesTracker`` keeps CUDA RNG states
  (``model_parallel_cuda_manual_seed``, ``random.py:446``): a tracker on CPU generators is
  installed before seeding.
- ``megatron/core/transformer/utils.py:44`` ``get_sliding_window_causal_mask`` builds the
  sliding-window mask with ``device="cuda"`` (called from ``fused_softmax.py:322`` for every
  attention with a ``window_size``: Mistral, gpt-oss): the same mask, built on the CPU.
- ``megatron/core/models/common/language_module/language_module.py:307`` moves the tied
  embedding/output weight to CUDA (``weight.data.cuda()``) before all-reducing it over the
  embedding group (tied embeddings under PP > 1): while that method runs, ``Tensor.cuda``
  leaves tensors on the CPU.
- ``megatron/core/dist_checkpointing/strategies/fully_parallel.py:195``
  ``FullyParallelLoadStrategyWrapper.load`` (which megatron-bridge's
  ``load_peft_adapter_checkpoint`` uses by default, ``megatron/bridge/peft/utils.py:427``) shares the
  shards read by one data-parallel rank with the others through CUDA tensors
  (``exchange_utils.py:506`` ``.cuda()``, ``:329`` and ``:97-109`` ``device="cuda"``): the same exchange
  runs here, over the data-parallel group's gloo, with the tensors it would move to a GPU left on the
  CPU (while the load runs, ``Tensor.cuda`` returns the tensor, and what ``exchange_utils`` allocates
  on "cuda" it allocates on the CPU).
A cost of CPU processes that is not the work under test, also answered here:
- ``megatron/core/jit.py:22`` makes ``jit_fuser`` ``torch.compile``; on CPU its first call runs
  Inductor, whose instruction-set probe starts about ten ``python -c "import torch"`` processes in
  every rank (15-35 s per cell for Gemma's fast_gelu and Nemotron's squared_relu,
  ``megatron/core/activations.py``): dynamo is turned off, so those run eagerly, with the same numbers.
Other CUDA assumptions are avoided by the CPU backend rather than patched: the default causal
mask (``megatron/core/transformer/utils.py:39``, ``device="cuda"``) by passing an explicit mask,
the pipeline schedules by a forward-only pass with point-to-point send/recv, and the alltoall
token dispatcher's CUDA stream by the allgather dispatcher.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["apply"]


@contextlib.contextmanager
def _tensors_stay_on_cpu() -> Iterator[None]:
    """While it is open, ``Tensor.cuda`` returns the tensor (a CPU process has no GPU to move it to)."""
    import torch

    to_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda t, *a, **k: t  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = to_cuda  # type: ignore[method-assign]


@contextlib.contextmanager
def _exchange_on_cpu() -> Iterator[None]:
    """While a fully parallel load runs: what its exchange puts on "cuda" stays on the CPU."""
    import torch
    from megatron.core.dist_checkpointing import exchange_utils
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def cpu(device: object) -> object:
        return "cpu" if str(device).startswith("cuda") else device

    class TorchOnCpu:
        """``torch`` as ``exchange_utils`` sees it: ``empty``/``empty_like`` on "cuda" allocate on the CPU."""

        def __getattr__(self, name: str) -> object:
            return getattr(torch, name)

        @staticmethod
        def empty(*size: object, device: object = None, **kwargs: object) -> torch.Tensor:
            return torch.empty(*size, device=cpu(device), **kwargs)  # type: ignore[call-overload]

        @staticmethod
        def empty_like(tensor: torch.Tensor, device: object = None, **kwargs: object) -> torch.Tensor:
            return torch.empty_like(tensor, device=cpu(device), **kwargs)  # type: ignore[arg-type]

    init_data = ShardedTensor.init_data
    ShardedTensor.init_data = lambda self, device, *a, **k: init_data(self, cpu(device), *a, **k)
    exchange_utils.torch = TorchOnCpu()
    try:
        with _tensors_stay_on_cpu():
            yield
    finally:
        exchange_utils.torch = torch
        ShardedTensor.init_data = init_data


def apply() -> None:
    import torch
    from megatron.core.tensor_parallel import random as mpu_random

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda device=None: None

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """The model-parallel RNG tracker, on CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    from megatron.core.fusions import fused_softmax

    def sliding_window_causal_mask_on_cpu(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask_on_cpu

    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer_on_cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with _tensors_stay_on_cpu():
            return setup(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer_on_cpu

    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    load = FullyParallelLoadStrategyWrapper.load

    def load_exchanging_on_cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with _exchange_on_cpu():
            return load(self, *args, **kwargs)

    FullyParallelLoadStrategyWrapper.load = load_exchanging_on_cpu

    mpu_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    import torch._dynamo

    torch._dynamo.config.disable = True
