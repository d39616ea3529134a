"""SGLang's side of the serving check, run as a script by the engine environment's python (its own pins,
never the harness's): ``python -P compat/serving/sglang.py SERVE_DIR``. NOT YET RUN on a GPU (issue 36).

It loads the HF base model with LoRA enabled as RL rollouts do (``sglang.Engine(enable_lora=True)``), then
the exported adapter (``load_lora_adapter``), each module group of it alone, and, for a memory cell, the
stream verl hands over with verl's config (``load_lora_adapter_from_tensors``, SGLang 0.5.8 on, as verl,
slime and miles load rollout adapters), and writes the full-vocab prompt log-probs of the cell's token ids
without the adapter and with each (``sglang.safetensors``). SGLang reports a refused adapter as
``success=False`` rather than raising: that is the finding, with its message. Settings read from sglang
0.5.17 (``srt/server_args.py``): adapters loaded after start need ``max_lora_rank`` and
``lora_target_modules`` up front (:9007-9010); MoE LoRA needs the triton MoE runner (``srt/lora/layers.py``
:982-1051); a shared-outer expert adapter loaded after start is not auto-detected (``lora_manager.py``
:576-579). Prompt log-probs are a plain log_softmax (``layers/logprob_processor.py:504``), position 0 has
none.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("engine_files", Path(__file__).with_name("engine_files.py"))
files = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(files)  # type: ignore[union-attr]  # compat/serving/engine_files.py, by its path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Cells served at once share the card: a serving-size model needs well under 1 GiB (as for vLLM).
MEMORY_SHARE = 0.05
FAST = {  # no CUDA graphs, no flashinfer JIT for attention or sampling: a small engine that starts fast
    "disable_cuda_graph": True,
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "lora_backend": "triton",
    "moe_runner_backend": "triton",
}


def _logprobs(output: dict[str, Any], vocab: int) -> Any:
    """[positions - 1, vocab]: the prompt log-probs of positions 1.. (position 0 has none)."""
    import torch

    rows = output["meta_info"]["input_top_logprobs"][1:]
    out = torch.full((len(rows), vocab), float("nan"), dtype=torch.float32)
    for i, row in enumerate(rows):
        ids = torch.tensor([int(t) for _, t, _ in row])
        out[i, ids] = torch.tensor([float(lp) for lp, _, _ in row], dtype=torch.float32)
    return out


def serve(serve_dir: Path) -> dict[str, Any]:
    """Run the requests; write ``sglang.safetensors``; return what ``sglang.json`` records."""
    import torch
    from safetensors.torch import load_file, save_file

    request = json.loads((serve_dir / "request.json").read_text())
    ids = load_file(str(serve_dir / "inputs.safetensors"))["ids"]
    adapter = Path(request["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    shared_outer = any(re.search(r"experts\.(gate_up_proj|down_proj)\.lora_", k) for k in keys)
    record: dict[str, Any] = {"seconds": {}}
    clock = time.monotonic()
    from importlib.metadata import version

    import sglang

    record["engine"] = f"sglang {version('sglang')}"
    record["seconds"]["import"] = round(time.monotonic() - clock, 2)
    clock = time.monotonic()
    engine = sglang.Engine(
        model_path=request["base"],
        dtype=DTYPES[request["dtype"]],
        enable_lora=True,
        max_lora_rank=rank,
        lora_target_modules=["all"],
        max_loras_per_batch=2,
        experts_shared_outer_loras=shared_outer,
        skip_tokenizer_init=True,
        context_length=max(64, ids.shape[-1] + 1),
        mem_fraction_static=MEMORY_SHARE,
        log_level="error",
        **FAST,
    )
    record["seconds"]["engine start"] = round(time.monotonic() - clock, 2)
    vocab = int(request["vocab_size"])
    prompts = [row.tolist() for row in ids]

    def run(lora: str | None) -> Any:
        outputs = engine.generate(
            input_ids=prompts,
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=vocab,
            lora_path=lora,
        )
        return torch.stack([_logprobs(o, vocab) for o in outputs])

    def loaded(name: str, result: Any) -> bool:
        if getattr(result, "success", False):
            return True
        record.setdefault("refused", {})[name] = str(getattr(result, "error_message", result))[:600]
        return False

    try:
        clock = time.monotonic()
        out = {"base": run(None)}
        groups = files.groups(adapter, serve_dir)
        requests = {"adapter": str(adapter), **{f"only:{g}": info["dir"] for g, info in groups.items()}}
        record["groups"] = {g: {k: v for k, v in info.items() if k != "dir"} for g, info in groups.items()}
        for name, path in requests.items():
            lora = name.replace(":", "-")
            try:
                if loaded(name, engine.load_lora_adapter(lora, path)):
                    out[name] = run(lora)
                engine.unload_lora_adapter(lora)
            except Exception as exc:  # SGLang refusing the adapter is the finding
                record.setdefault("refused", {})[name] = files.refusal(exc, "sglang")
        memory = request.get("memory")
        if memory:  # the adapter as verl's rollout sync hands it: tensors and verl's config, no file
            try:
                peft_config = {"peft_type": "LORA", **memory["peft_config"]}
                tensors = load_file(memory["tensors"])
                if loaded("memory", engine.load_lora_adapter_from_tensors("memory", tensors, peft_config)):
                    out["memory"] = run("memory")
            except Exception as exc:
                record.setdefault("refused", {})["memory"] = files.refusal(exc, "sglang")
        record["seconds"]["requests"] = round(time.monotonic() - clock, 2)
        save_file({k: v.contiguous() for k, v in out.items()}, str(serve_dir / "sglang.safetensors"))
    finally:
        engine.shutdown()  # its scheduler processes hold the GPU until then
    return record


if __name__ == "__main__":
    files.run_script("sglang", "sglang", serve)
