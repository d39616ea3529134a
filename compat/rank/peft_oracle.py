"""The forward oracle, peft's side: what each LoRA layer peft built added in its forward pass.

peft loads the exported files into its own modules and applies them in its own forward; a module
applied to the wrong input, with the wrong scaling, twice, or not at all reaches the logits only
through their noise. Every peft LoRA linear is recorded in the forward whose logits are compared
with Megatron's (input, base output, output) and its contribution judged against the *files'*
``scaling * X @ A.T @ B.T`` (``compat.checks.adapter_files``), with the rounding bound of that one
product (``compat.checks.contribution``). A module the files adapt that peft's forward never
applied is a problem.

peft's fused-expert ``ParamWrapper`` (transformers 5's 3-D expert parameters) adds its delta inside
the experts' fused GEMMs: nothing of it is visible at a module boundary, so those weights are judged
at rest (``compat.checks.fused_experts``) and by Megatron's side, and said so in the coverage.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from compat.checks.adapter_files import FileAdapter
from compat.checks.adapter_names import PREFIX
from compat.checks.contribution import UNIT_ROUNDOFF, judge, noise_model

__all__ = ["PeftRecorder"]


class PeftRecorder:
    """Hooks on peft's LoRA linears for one forward; then :meth:`judge` against the files."""

    def __init__(self, peft_model: Any) -> None:
        self.layers: dict[str, Any] = {}
        self.fused: list[str] = []
        for name, m in peft_model.named_modules():
            module = name.removeprefix(PREFIX)
            if hasattr(m, "parameter_name") and hasattr(m, "lora_A"):
                self.fused.append(f"{re.sub(r'(\.base_layer)+$', '', module)}.{m.parameter_name}")
            elif (
                hasattr(m, "lora_A")
                and hasattr(m, "base_layer")
                and isinstance(getattr(m.base_layer, "weight", None), torch.Tensor)
            ):
                if isinstance(m.base_layer, torch.nn.Linear):
                    self.layers[module] = m
        self.calls: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> PeftRecorder:
        for module, m in self.layers.items():
            self._hooks += [
                m.register_forward_pre_hook(self._put(module, "x")),
                m.base_layer.register_forward_hook(self._out(module, "b")),
                m.register_forward_hook(self._out(module, "y")),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()

    def _put(self, module: str, key: str) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            self.calls.setdefault(module, {})[key] = args[0].detach()

        return hook

    def _out(self, module: str, key: str) -> Any:
        def hook(_m: Any, _args: tuple, out: Any) -> None:
            self.calls.setdefault(module, {})[key] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    def judge(self, files: FileAdapter, dtype: str) -> list[dict[str, Any]]:
        """One entry per module the files adapt or peft wrapped (HF weight names, as coverage counts them)."""
        out = []
        for module in sorted(set(files.factors) | set(self.layers)):
            entry: dict[str, Any] = {"name": f"{module}.weight", "hf": [f"{module}.weight"], "where": _layer(module)}
            source = module if module in files.factors else _renamed(self.layers.get(module), files)
            if source and source != module:  # loaded from the file's pair under its checkpoint name
                entry["where"] = f"{entry['where']}, the file's {source}".lstrip(", ")
                call = self.calls.get(module, {})
                if not all(k in call for k in "xby"):
                    out.append({**entry, "judged": True, "ok": False, "finding": "peft's LoRA layer did not run"})
                else:
                    out.append({**entry, **_judge(self.layers[module], call, files, source, dtype)})
                continue
            if module in self.layers and module not in files.factors:  # the files say: adds nothing
                call = self.calls.get(module, {})
                if all(k in call for k in "by"):
                    d = (call["y"].double() - call["b"].double()).abs().max()
                    ok = float(d) == 0.0
                    finding = "" if ok else f"the files hold no LoRA pair for it; peft adds up to {float(d):.3e}"
                    residual = 0.0 if ok else float("inf")
                    out.append(
                        {**entry, "judged": True, "ok": ok, "gain": 1.0, "residual": residual, "finding": finding}
                    )
                    continue
            if module not in self.layers:  # peft placement names a module the files adapt and peft did not wrap
                why = (
                    "peft applies it inside a fused-expert ParamWrapper"
                    if _fused(module, self.fused)
                    else ("peft built no LoRA layer for it")
                )
                out.append({**entry, "judged": False, "why": why})
                continue
            if files.config.get("use_dora") and module not in files.magnitudes:  # the file check names it
                out.append({**entry, "judged": False, "why": "the files hold no DoRA magnitude for it"})
                continue
            call = self.calls.get(module, {})
            if not all(k in call for k in "xby"):
                out.append(
                    {**entry, "judged": True, "ok": False, "finding": "peft's LoRA layer did not run in the forward"}
                )
                continue
            out.append({**entry, **_judge(self.layers[module], call, files, module, dtype)})
        return out


def _renamed(layer: Any, files: FileAdapter) -> str:
    """The file's module whose pair peft loaded into ``layer`` under another name (transformers renames
    checkpoint modules on load: HY-V3's mlp.shared_mlp is mlp.shared_experts), found by value: the
    harness's adapter values are seeded per tensor, so equal factor pairs are the same pair. "" if none."""
    if layer is None or "default" not in getattr(layer, "lora_A", {}):
        return ""
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    for module, f in files.factors.items():  # both factors: gate and up of one fused fc1 share their A
        if f.a.shape == a.shape and f.b.shape == b.shape and torch.equal(f.a.to(a.device, a.dtype), a):
            if torch.equal(f.b.to(b.device, b.dtype), b):
                return module
    return ""


def _layer(module: str) -> str:
    m = re.search(r"layers\.(\d+)\.", module)
    e = re.search(r"experts\.(\d+)\.", module)
    return " ".join(([f"layer {m.group(1)}"] if m else []) + ([f"expert {e.group(1)}"] if e else []))


def _fused(module: str, fused: list[str]) -> bool:
    """``model.layers.0.mlp.experts.3.gate_proj`` lies in the fused ``model.layers.0.mlp.experts.gate_up_proj``."""
    parent = re.sub(r"\.\d+\.[^.]+$", "", module)
    return any(f.startswith(parent + ".") for f in fused)


def _judge(layer: Any, call: dict[str, torch.Tensor], files: FileAdapter, module: str, dtype: str) -> dict[str, Any]:
    f = files.factors[module]
    x = call["x"].reshape(-1, call["x"].shape[-1]).double()
    b = call["b"].reshape(-1, call["b"].shape[-1]).double()
    y = call["y"].reshape(-1, call["y"].shape[-1]).double()
    a, bb = f.a.to(x.device).double(), f.b.to(x.device).double()
    if a.shape[1] != x.shape[1] or bb.shape[0] != y.shape[1]:
        shapes = f"lora_A {tuple(a.shape)}, lora_B {tuple(bb.shape)}"
        finding = f"the files' factors ({shapes}) do not fit its input {x.shape[1]} / output {y.shape[1]}"
        return {"judged": True, "ok": False, "finding": finding}
    h = x @ a.T
    ref = f.scaling * h @ bb.T
    through_b = f.scaling * ((h * h) @ (bb * bb).T).sqrt()
    through_a = f.scaling * (((x * x) @ (a * a).T) @ (bb * bb).T).sqrt()
    extra = None
    if module in files.magnitudes:  # DoRA: m / ||W + delta|| per row, peft's maths (its lora/dora.py)
        w = layer.base_layer.weight.detach().double()
        ratio = files.magnitudes[module].to(x.device).double() / (w + files.delta(module).to(w.device).double()).norm(
            dim=1
        )
        bias = layer.base_layer.bias
        plain = b - (bias.detach().double() if bias is not None else 0.0)
        ref = (ratio - 1) * plain + ratio * ref
        extra = 2 * UNIT_ROUNDOFF[dtype] * ratio * (plain.abs() + ref.abs())
        through_b, through_a = ratio * through_b, ratio * through_a
    noise = noise_model(dtype, y, ref, through_b, through_a, x.shape[1], a.shape[0], extra)
    j = judge(y - b, ref, noise, dtype)
    return {"judged": True, "ok": j.ok, "gain": j.gain, "gain_allowed": j.gain_allowed, "residual": j.residual,
            "residual_allowed": j.residual_allowed, "rows": list(j.rows), "tokens": j.tokens,
            "finding": "" if j.ok else j.describe()}  # fmt: skip
