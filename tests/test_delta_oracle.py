"""The oracles' arithmetic on hand-made tensors (no model, no ranks): the files' deltas as peft scales
them, the at-rest comparison and its exact import of a delta, and the in-flight judgement's bound."""

from __future__ import annotations

import json

import pytest
import torch

from compat.checks.adapter_files import FileAdapter, LazyDeltas
from compat.checks.contribution import UNIT_ROUNDOFF, judge, noise_model
from compat.checks.oracles import AT_REST, MEGATRON_FLIGHT, at_rest_problems, coverage, flight_problems
from compat.rank.delta_oracle import DELTA_RTOL, compare_delta, imported_delta

Q = "model.layers.1.self_attn.q_proj"
OPROJ = "model.layers.1.self_attn.o_proj"


@pytest.fixture
def adapter_dir(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 16, generator=g),
        f"base_model.model.{Q}.lora_B.weight": torch.randn(32, 4, generator=g),
        f"base_model.model.{OPROJ}.lora_A.weight": torch.randn(2, 32, generator=g),
        f"base_model.model.{OPROJ}.lora_B.weight": torch.randn(16, 2, generator=g),
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"o_proj": 6}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path, tensors


def test_file_deltas_scale_as_peft_does(adapter_dir):
    path, t = adapter_dir
    files = FileAdapter.read(path)
    q = 8 / 4 * (t[f"base_model.model.{Q}.lora_B.weight"] @ t[f"base_model.model.{Q}.lora_A.weight"])
    o = 6 / 2 * (t[f"base_model.model.{OPROJ}.lora_B.weight"] @ t[f"base_model.model.{OPROJ}.lora_A.weight"])
    assert torch.equal(files.delta(Q), q) and torch.equal(files.delta(OPROJ), o)
    lazy = LazyDeltas(files, {Q: (32, 16), OPROJ: (16, 32), "model.layers.1.mlp.down_proj": (16, 64)}, "cpu")
    assert torch.equal(lazy[f"{Q}.weight"], q)
    assert torch.equal(lazy["model.layers.1.mlp.down_proj.weight"], torch.zeros(16, 64))  # not adapted: no delta
    with pytest.raises(KeyError):
        lazy["model.layers.9.mlp.down_proj.weight"]


def test_equal_deltas_pass_and_rolled_rows_are_named():
    want = torch.randn(32, 16)
    assert compare_delta(want.clone(), want)["ok"]
    rolled = compare_delta(want.roll(8, dims=0), want)
    assert not rolled["ok"] and rolled["rel"] > DELTA_RTOL and rolled["finding"].startswith("rows 0-31 of 32")


def test_one_row_off_is_found_and_rounding_is_not():
    want = torch.randn(32, 16)
    assert compare_delta(want * (1 + 1e-7), want)["ok"]
    off = want.clone()
    off[5] += 1e-3 * want.abs().max()
    assert compare_delta(off, want)["finding"].startswith("rows 5 of 32")
    assert compare_delta(want * float("nan"), want)["ok"] is False


def test_a_weight_the_export_leaves_unchanged_is_missing():
    out = compare_delta(torch.zeros(8, 4), torch.ones(8, 4))
    assert out["missing"] and not out["ok"]


class _CastingMapping:
    """Like the bridge's mappings: casts to the parameter's dtype, then lays out (here: q/k rows fused)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def hf_to_megatron(self, hf, module):
        return torch.cat([hf["q"].to(self.dtype), hf["k"].to(self.dtype)])


def test_a_delta_imported_through_a_casting_conversion_is_exact_in_bf16():
    """The conversion casts to bf16; three bf16 pieces carry all 24 bits of the fp32 delta."""
    hf = {"q": torch.randn(4, 8) * 1e-2, "k": torch.randn(2, 8) * 1e-2}
    got = imported_delta(_CastingMapping(torch.bfloat16), hf, None, torch.bfloat16)
    assert torch.equal(got, torch.cat([hf["q"], hf["k"]]))
    once = _CastingMapping(torch.bfloat16).hf_to_megatron(hf, None).float()  # one piece: 2^-8 off
    assert not compare_delta(once, torch.cat([hf["q"], hf["k"]]))["ok"]


def _flight(dtype: str, gain: float = 1.0, tokens: int = 32, k: int = 64, out: int = 96, r: int = 8):
    """A module's observed contribution, computed in ``dtype`` as a bf16/fp32 forward would, times ``gain``."""
    g = torch.Generator().manual_seed(1)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x = torch.randn(tokens, k, generator=g).to(dt)
    a, b = (torch.randn(r, k, generator=g) * 0.05).to(dt), (torch.randn(out, r, generator=g) * 0.05).to(dt)
    w = (torch.randn(out, k, generator=g) * 0.02).to(dt)
    base = x @ w.T
    adapter = ((x @ a.T) @ b.T) * 2.0
    y = base + adapter * gain
    xd, ad, bd = x.double(), a.double(), b.double()
    h = xd @ ad.T
    ref = 2.0 * h @ bd.T
    through_b = 2.0 * ((h * h) @ (bd * bd).T).sqrt()
    through_a = 2.0 * (((xd * xd) @ (ad * ad).T) @ (bd * bd).T).sqrt()
    noise = noise_model(dtype, y.double(), ref, through_b, through_a, k, r)
    return judge(y.double() - base.double(), ref, noise, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_correct_contribution_passes_and_a_two_percent_scale_fails(dtype):
    assert _flight(dtype).ok, _flight(dtype).describe()
    off = _flight(dtype, gain=1.02)
    assert not off.ok and abs(off.gain - 1.02) < 0.005, off.describe()
    assert _flight(dtype, gain=1.3).gain == pytest.approx(1.3, abs=0.01)


def test_the_bound_is_the_dtypes_rounding_not_a_fixed_number():
    fp32, bf16 = _flight("fp32"), _flight("bf16")
    assert fp32.residual_allowed < 1e-5 < UNIT_ROUNDOFF["bf16"] < bf16.residual_allowed < 0.05


def test_a_contribution_on_the_wrong_rows_is_a_residual_whatever_its_gain():
    ref = torch.randn(16, 8, dtype=torch.float64)
    noise = torch.full_like(ref, 1e-3)
    j = judge(ref.roll(1, dims=0), ref, noise, "bf16")
    assert not j.ok and j.residual > 0.5 and len(j.rows) == 16


def test_nan_in_a_contribution_fails():
    ref = torch.randn(4, 8, dtype=torch.float64)
    d = ref.clone()
    d[1, 2] = float("nan")
    assert not judge(d, ref, torch.full_like(ref, 1e-3), "bf16").ok


def _entry(name, ok=True, judged=True, **kw):
    return {"name": name, "hf": [name.replace("decoder", "model")], "where": "layer 1", "judged": judged, "ok": ok,
            "finding": "" if ok else "gain 1.3000", "rel": 0.0, "residual": 0.0, **kw}  # fmt: skip


def test_every_failing_weight_is_named_in_the_problems_tensors():
    entries = [_entry(f"decoder.layers.1.mlp.experts.{e}.fc1", ok=e != 2 and e != 3, residual=0.3) for e in range(4)]
    (p,) = flight_problems(entries, MEGATRON_FLIGHT)
    assert p.check == "forward oracle" and "in flight, Megatron: 2 of 4 adapted weights" in p.message
    assert p.tensors == ("decoder.layers.1.mlp.experts.2.fc1", "decoder.layers.1.mlp.experts.3.fc1")


def test_coverage_counts_each_oracle_and_a_weight_none_judged_is_skipped():
    rest = {"status": "ran", "entries": [_entry("decoder.a"), _entry("decoder.b", judged=False, why="x")], "extra": []}
    data, problems, skipped = coverage(rest, [_entry("decoder.a")], [], {"decoder.router": "unknown wrapper"})
    assert data["judged"][AT_REST] == 1 and data["by_weight"]["model.a"] == [AT_REST, MEGATRON_FLIGHT]
    assert set(data["unjudged"]) == {"model.b", "decoder.router"} and problems == []
    assert skipped.startswith("2 of 3 adapted weights judged by no oracle")
    _, problems, _ = coverage({"status": "ran", "entries": [_entry("decoder.b", judged=False, why="x")]}, [], [])
    assert problems and "no oracle judged any of the 1 adapted weights" in problems[0].message


def test_the_at_rest_problems_keep_shards_and_name_both_names():
    bad = _entry("decoder.layers.1.q", ok=False, rel=0.5)
    bad["finding"] = "rows 0-7 of 48"
    problems = at_rest_problems({"status": "ran", "entries": [_entry("decoder.layers.1.q"), bad], "extra": ["model.x"]})
    assert "differs from Megatron's stored delta in 1 of 1 weights" in problems[0].message
    assert "model.layers.1.q" in problems[0].message and problems[1].tensors == ("model.x",)
