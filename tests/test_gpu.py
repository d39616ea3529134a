"""GPU cells (NCCL): skipped with the reason where no GPU is visible; the CPU matrix runs anyway."""

import pytest

from compat.declare.cells import Cell
from compat.declare.layouts import Layout

torch = pytest.importorskip("torch")
gpus = torch.cuda.device_count()


@pytest.mark.skipif(gpus < 1, reason="no CUDA GPU visible: GPU evidence is committed under matrix/results/")
def test_a_cell_on_one_gpu():
    from compat.launch.launcher import run_cell

    result = run_cell(Cell.make("llama", Layout()), "cuda")
    assert result.status == "pass", result.reason


@pytest.mark.skipif(gpus < 2, reason=f"needs 2 CUDA GPUs, {gpus} visible")
def test_tensor_parallel_over_nccl():
    from compat.launch.launcher import run_cell

    result = run_cell(Cell.make("llama", Layout(tp=2)), "cuda")
    assert result.status == "pass", result.reason
