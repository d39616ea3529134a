"""Plugins that write their own layout (verl's ``model/dist_ckpt``, ``model/huggingface/adapter``).

The checks read where a plugin says it wrote; the bridge's own loader cross-checks any dist
checkpoint, whoever wrote it; a plugin's temporary files stay in the cell; what it called is in
the cell's record. The plugins: ``tests/faults/own_layout.py``.
"""

from __future__ import annotations

import re

import pytest
from faults.catalogue import by_name
from test_faults import plant

from compat.declare.cells import Cell
from compat.declare.layouts import Layout
from compat.declare.plugins import Plugins

pytestmark = pytest.mark.cell

OWN = Plugins(saver="faults.own_layout:save", loader="faults.own_layout:load", exporter="faults.own_layout:export")


def run(backend: str, workdir, plugins: Plugins = OWN, dtype: str = "fp32", keep: bool = False):
    from compat.launch.launcher import run_cell

    return run_cell(Cell.make("llama", Layout(), dtype=dtype), backend, workdir=workdir, plugins=plugins, keep=keep)


@pytest.mark.xdist_group("own_layout")
def test_the_checks_read_where_the_plugins_wrote(monkeypatch, tmp_path, compat_backend):
    plant(monkeypatch, None)
    result = run(compat_backend, tmp_path, keep=True)
    assert result.status == "pass", result.reason
    calls = result.metrics["plugin_calls"]
    assert [(c["role"], c.get("wrote")) for c in calls] == [
        ("saver", "checkpoint/model/dist_ckpt"),
        ("loader", None),
        ("exporter", "adapter/model/huggingface/adapter"),
    ]
    save = next(n for n in calls[0]["calls"] if n["call"] == "megatron.core.dist_checkpointing.save")
    assert save["path"] == "checkpoint/model/dist_ckpt"
    assert re.fullmatch(r"faults\.own_layout:\d+ save", save["by"][0]), save["by"]
    load = next(n for n in calls[1]["calls"] if n["call"].endswith("Module.load_state_dict"))
    assert load["strict"] is False and load["missing_adapter_keys"] == 0 and load["missing_base_keys"] > 0
    assert list(tmp_path.glob("llama.tp1-*/tmp/own_layout_*.lock")), "the plugin's temp file is not in the cell"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.xdist_group("bridge_loader_corrupts")
def test_the_bridge_loader_cross_checks_a_plugins_dist_checkpoint(dtype, monkeypatch, tmp_path, compat_backend):
    """The fault ``bridge_loader_corrupts`` is caught with a user's saver and loader too: the cross-check runs."""
    fault = by_name("bridge_loader_corrupts")
    plant(monkeypatch, fault.name)
    result = run(compat_backend, tmp_path, dtype=dtype)
    assert result.status == "fail", result.reason
    assert all(re.search(p, result.reason) for p in fault.patterns(dtype)), result.reason


@pytest.mark.xdist_group("own_layout")
def test_a_path_outside_the_cell_fails_the_cell(monkeypatch, tmp_path, compat_backend):
    plant(monkeypatch, None)
    result = run(compat_backend, tmp_path, Plugins(saver="faults.own_layout:save_outside"))
    assert result.status == "fail", result.reason
    assert "saver faults.own_layout:save_outside returned" in result.reason, result.reason
    assert "outside the cell's directory" in result.reason, result.reason
