"""peft's merged weights against the bridge's merged HF export, tensor by tensor, in memory where they are.

Two exports of one adapter by two code paths of the bridge (the adapter export then peft's merge;
the bridge's own merge) must agree as weights, which no forward-pass noise blurs: a wrong split
(q/k, gate/up) shows in bf16 as clearly as in fp32, named by tensor. At real widths every byte read
again costs (issue 35): the weights are taken from the models already loaded, named as their
checkpoints name them, and the files are read only for what those models do not hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compat.checks.compare import WEIGHT_TOLERANCES, Tolerance, compare
from compat.rank.export import MERGED_EXPORT
from compat.rank.paths import CellPaths

__all__ = ["base_state", "merged_weights"]


def merged_weights(
    merged_model: Any,
    exported_model: Any,
    base: dict[str, torch.Tensor] | None,
    paths: CellPaths,
    dtype: torch.dtype,
    device: Any,
) -> dict[str, Any]:
    """peft's merged model (``merged_model``) against the bridge's merged export as its forward loaded it
    (``exported_model``), tensor by tensor; a tensor the model does not hold in the file's dtype is read
    from the file, whose names decide what is missing or extra. ``base``: the base weights before peft
    merged into them (:func:`base_state`), else the base checkpoint's."""
    k = WEIGHT_TOLERANCES[{torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]]
    ours, file = _in_memory_state(merged_model), _Lazy(paths.merged)
    if ours is None:  # a transformers without save_pretrained's steps: its own writing, read back
        merged_model.save_pretrained(paths.peft_merged)
        ours = _Lazy(paths.peft_merged).all()
    loaded = _in_memory_state(exported_model) or {}
    problems, worst = [], 0.0
    missing, extra = sorted(set(file) - set(ours)), sorted(set(ours) - set(file))
    if missing or extra:
        problems.append(
            f"the merged exports hold other tensors: {len(missing)} only in the bridge's (e.g. {missing[:2]}), "
            f"{len(extra)} only in peft's (e.g. {extra[:2]})"
        )
    differ: list[tuple[float, str, Tolerance]] = []
    bases: dict[str, torch.Tensor] | _Lazy = base if base is not None else _Lazy(paths.hf)
    common = sorted(set(file) & set(ours))
    for name in common:
        want = ours[name]
        got = loaded.get(name)
        if got is None or got.dtype != file.dtype(name):
            got = file[name]
        got = got.to(want.device)
        if got.dtype == want.dtype and torch.equal(got, want):
            continue  # 0 apart, within any tolerance (most tensors: no adapter touches them)
        got, want = got.to(device).double(), want.to(device).double()  # on the cell's device
        delta = float((want - bases[name].to(device).double()).abs().max()) if name in bases else 0.0
        tol = Tolerance(atol=max(k * delta, 1e-8), rtol=k)  # an ulp of the value and of the merged delta
        c = compare(got, want, tol)
        worst = max(worst, c.max_abs_diff)
        if not c.ok:
            differ.append((c.max_abs_diff, name, tol))
    if differ:
        shown = ", ".join(
            f"{n} (max |diff| {d:.3e}, up to {t} allowed)" for d, n, t in sorted(differ, reverse=True)[:3]
        )
        problems.append(
            f"peft merge_and_unload's weights differ from the bridge's merged HF export in {len(differ)} of "
            f"{len(common)} tensors, e.g. {shown}"
        )
    status = "fail" if problems else "pass"
    return {"status": status, "max_abs_diff": worst, "reason": "; ".join(problems)}


def base_state(model: Any, skipped: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The HF base model's weights in checkpoint naming, copied on its own device before peft merges
    into them: the merged weights' tolerance is an ulp of each merged delta, and reading the base
    checkpoint again for it costs a model's bytes from disk (issue 35). None where no merged export
    is compared, or this transformers cannot name the weights as its checkpoint does."""
    if MERGED_EXPORT in skipped:
        return None
    state = _in_memory_state(model)
    return None if state is None else {name: t.detach().clone() for name, t in state.items()}


def _in_memory_state(model: Any) -> dict[str, torch.Tensor] | None:
    """An HF model's weights in checkpoint naming, as ``save_pretrained`` would write them (transformers
    fuses MoE experts only in memory), without writing them: ``save_pretrained``'s own two steps
    (transformers 5.12 ``modeling_utils.py:3507-3511``: tied weights removed, the load-time conversion
    reverted) on the in-memory state dict. A 1.7B-shaped fp32 model is 7 GB not written and read back.
    None where a transformers release lacks them."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return None
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return revert_weight_conversion(model, state)


_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _Lazy:
    """An HF checkpoint's tensors, each read from its safetensors file when asked (most are compared once)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        self._dtypes: dict[str, torch.dtype | None] = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                self._files.update(dict.fromkeys(h.keys(), f))
                self._dtypes.update({k: _FILE_DTYPES.get(h.get_slice(k).get_dtype()) for k in h.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __iter__(self) -> Any:
        return iter(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as h:
            return h.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's dtype as the file stores it."""
        return self._dtypes[name]

    def all(self) -> dict[str, torch.Tensor]:
        return {name: self[name] for name in self._files}
