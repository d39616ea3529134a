"""verl's checkpoint manager, judged by every check of megatron-lora-compat at the layouts verl trains at."""

import pytest

from compat.pytest_plugin import CellFailed


def test_cell(compat_cell, compat_run):
    """Each cell of matrix.toml, saved, exported and loaded by verl (pytest.ini names the plugins)."""
    compat_run(compat_cell).assert_met()


@pytest.mark.xfail(strict=True, raises=CellFailed, reason="negative control: a verl save drops every linear_fc2 lora_B")
def test_a_broken_verl_save_is_caught(compat_run):
    """The harness catches a broken verl save (verl's non-strict load would resume from it silently)."""
    from compat import Cell, Layout

    run = compat_run(Cell.make("llama", Layout()), saver="verl_ckpt.broken:save")
    reason = run.result.reason or ""
    if run.result.status != "pass" and "checkpoint lacks" not in reason:
        pytest.fail(f"caught, but not by the checkpoint contents check: {run.result.status}: {reason}")
    run.assert_met()
