"""Warm rank groups: the same numbers as fresh processes, nothing carried from one cell to the next,
nothing kept that cannot be trusted, and a cell's files kept only when its outcome was not the expected one."""

from __future__ import annotations

import pytest

from compat.declare.cells import Cell
from compat.declare.expected import Expected
from compat.declare.layouts import Layout
from compat.launch.launcher import run_cell
from compat.launch.pool import Pool
from compat.rank.export import MEGATRON_MERGED, MERGED_EXPORT, PEFT_MERGED

pytestmark = pytest.mark.cell


@pytest.fixture
def warm():
    ranks = Pool("warm")
    yield ranks
    ranks.shutdown()


def _pids(ranks: Pool) -> set[int]:
    return {p.pid for g in ranks._idle for p in g.procs}


def test_a_warm_group_runs_cell_after_cell_with_the_numbers_of_a_fresh_one(warm, tmp_path):
    cell = Cell.make("llama", Layout(tp=2))
    cold = Pool("cold")
    fresh = run_cell(cell, "cpu", workdir=tmp_path, ranks=cold)
    first = run_cell(cell, "cpu", workdir=tmp_path, ranks=warm)
    pids = _pids(warm)
    second = run_cell(cell, "cpu", workdir=tmp_path, ranks=warm)
    assert fresh.status == first.status == second.status == "pass", (fresh.reason, second.reason)
    assert _pids(warm) == pids and len(pids) == 2, "the second cell did not reuse the warm group"
    assert fresh.max_abs_diff == first.max_abs_diff == second.max_abs_diff
    assert fresh.adapter_effect == second.adapter_effect
    assert not _pids(cold), "cold ranks were kept"


def test_a_cell_starts_from_the_environment_the_previous_one_had(warm, tmp_path):
    """megatron sets NVTE_*_ATTN for the attention backend it configures (llama: auto); before the
    environment was restored between cells, a gemma cell on the same warm rank then failed its check
    ("NVTE_FUSED_ATTN set to 1, but expected 0 for attention backend type flash")."""
    llama = run_cell(Cell.make("llama", Layout()), "cpu", workdir=tmp_path, ranks=warm)
    pids = _pids(warm)
    gemma = run_cell(Cell.make("gemma", Layout()), "cpu", workdir=tmp_path, ranks=warm)
    assert llama.status == "pass" and gemma.status == "pass", gemma.reason
    assert _pids(warm) == pids


def test_a_group_whose_rank_raised_is_replaced(warm, tmp_path):
    """DoRA on SequentialMLP experts raises in the bridge's forward (an expected error): that group is not reused."""
    cell = Cell.make("qwen3_moe", Layout(), adapter="dora")
    expected = Expected("error", match=("RuntimeError: Sizes of tensors must match except in dimension 0",))
    broken = run_cell(cell, "cpu", expected, workdir=tmp_path, ranks=warm)
    assert broken.status == "error" and broken.met, broken.reason
    assert not _pids(warm), "a group whose rank raised went back to the pool"
    clean = run_cell(Cell.make("llama", Layout()), "cpu", workdir=tmp_path, ranks=warm)
    assert clean.status == "pass", clean.reason


def test_files_are_kept_only_for_an_outcome_other_than_the_expected_one(warm, tmp_path):
    cell = Cell.make("llama", Layout())
    met = run_cell(cell, "cpu", workdir=tmp_path, ranks=warm)
    assert met.met and met.files is None
    unmet = run_cell(cell, "cpu", Expected("fail", "planted expectation"), workdir=tmp_path, ranks=warm)
    assert not unmet.met and unmet.files is not None
    assert [p.name for p in tmp_path.iterdir()] == [unmet.files.rsplit("/", 1)[1]]


def test_every_merged_form_is_reported_run_or_skipped_with_the_reason(warm, tmp_path):
    """Every merged form is in the results: run, or ``skipped`` with the reason."""
    r = run_cell(Cell.make("llama", Layout(), adapter="canonical"), "cpu", workdir=tmp_path, ranks=warm)
    assert r.status == "pass", r.reason
    merged = r.metrics["merged"]
    assert merged[PEFT_MERGED]["status"] == merged[MERGED_EXPORT]["status"] == "pass"
    assert merged[MEGATRON_MERGED]["status"] == "skipped"
    why = merged[MEGATRON_MERGED]["reason"]
    assert "offers no merged weight for LoRALinearSplitFC1UpGate, LoRALinearSplitQKV" in why
