"""Our exporter, judged by every check of megatron-lora-compat, at the layouts we train at."""

import pytest


def test_cell(compat_cell, compat_run):
    """Each cell of matrix.toml, with the exporter of pytest.ini."""
    compat_run(compat_cell).assert_met()


@pytest.mark.parametrize(
    ("exporter", "says"),
    [
        ("ckpt_manager.buggy:alpha_as_rank", "adapter_config.json: lora_alpha is 8, expected 16"),
        ("ckpt_manager.buggy:drops_a_lora_b", "model.layers.1.mlp.up_proj: lora_B is missing"),
    ],
)
def test_a_buggy_exporter_fails_with_what_is_wrong(compat_run, exporter, says):
    from compat import Cell, Layout

    result = compat_run(Cell.make("llama", Layout()), exporter=exporter).result
    assert result.status == "fail"
    assert says in result.reason, result.reason
