"""vLLM's side of the serving check, run as a script by the engine environment's python (torch and vLLM
of its own pins, never the harness's): ``python compat/serving/vllm.py SERVE_DIR``.

It loads the HF base model and the exported adapter as vLLM users do (``LLM(enable_lora=True)``, a
``LoRARequest`` per adapter) and writes the full-vocab prompt log-probs of the cell's token ids
without the adapter, with it, and with each module group of it alone (``self_attn``, ``mlp``, ...:
a group that vLLM loads but does not apply moves nothing). It imports nothing of the harness: the
comparison is the launcher's (compat/serving/__init__.py). The settings are the in-process fast ones
measured on a 2-core CPU (FIELD-NOTES "vLLM"): import 6-20 s, engine start 3-7 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("engine_files", Path(__file__).with_name("engine_files.py"))
files = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(files)  # type: ignore[union-attr]  # compat/serving/engine_files.py, by its path

FAST_ENV = {
    "TORCH_COMPILE_DISABLE": "1",  # else inductor compiles gather_logprobs: 13-28 s
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: 3-7 s, not 20-41 s
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts
# On a GPU, cells served at once (--jobs) share the card: vLLM's default gpu_memory_utilization, 0.9,
# gives the first engine the card and refuses the next. A serving-size model (hidden 64, 64 positions)
# needs well under 1 GiB: 0.05 of an H200 is 7 GiB, room for the CUDA context, kernels and KV cache.
GPU_MEMORY_SHARE = 0.05
# A KV cache of a fixed size: vLLM then skips its memory profiling (vllm/v1/worker/gpu_worker.py:462-480
# of 0.26.0), whose assertion that no other process freed GPU memory meanwhile (:532, "Error in memory
# profiling") any other engine or rank process ending on the same card trips. 256 MiB holds the serving
# families' 64 positions many times over (4 layers x 4 KV heads x head_dim 32 x 2 x bf16 = 2 KiB/token).
KV_CACHE_BYTES = 256 << 20


def _logprobs(output: Any, vocab: int) -> Any:
    """[positions - 1, vocab]: the prompt log-probs of positions 1.. (position 0 has none)."""
    import torch

    rows = output.prompt_logprobs[1:]
    out = torch.full((len(rows), vocab), float("nan"), dtype=torch.float32)
    for i, row in enumerate(rows):
        ids = torch.tensor(list(row.keys()))
        out[i, ids] = torch.tensor([lp.logprob for lp in row.values()], dtype=torch.float32)
    return out


def serve(serve_dir: Path) -> dict[str, Any]:
    """Run the requests; write ``vllm.safetensors``; return what ``vllm.json`` records."""
    os.environ.update({k: v for k, v in FAST_ENV.items() if k not in os.environ})
    import torch
    from safetensors.torch import load_file, save_file

    request = json.loads((serve_dir / "request.json").read_text())
    ids = load_file(str(serve_dir / "inputs.safetensors"))["ids"]
    adapter = Path(request["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    record: dict[str, Any] = {"seconds": {}}
    clock = time.monotonic()
    from importlib.metadata import version

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    record["engine"] = f"vllm {version('vllm') if _has('vllm') else version('vllm-cpu')}"
    record["seconds"]["import"] = round(time.monotonic() - clock, 2)
    clock = time.monotonic()
    llm = LLM(
        model=request["base"],
        dtype=DTYPES[request["dtype"]],
        enable_lora=True,
        max_lora_rank=next(r for r in LORA_RANKS if r >= rank),
        max_loras=1,
        max_model_len=max(64, ids.shape[-1] + 1),
        max_logprobs=-1,
        enforce_eager=True,
        skip_tokenizer_init=True,
        distributed_executor_backend="uni",
        **(
            {"gpu_memory_utilization": GPU_MEMORY_SHARE, "kv_cache_memory_bytes": KV_CACHE_BYTES}
            if torch.cuda.is_available()
            else {}
        ),
    )
    record["seconds"]["engine start"] = round(time.monotonic() - clock, 2)
    params = SamplingParams(prompt_logprobs=-1, max_tokens=1, detokenize=False)
    prompts = [{"prompt_token_ids": row.tolist()} for row in ids]
    vocab = int(request["vocab_size"])

    def run(lora: Any) -> Any:
        # One prompt per call: with enable_lora, prompt log-probs of several requests in one batch
        # raise in the LoRA logits processor, which takes one sampler index per request for every
        # prompt position ("einsum(): subscript b has size 2 ... size 15",
        # vllm/lora/punica_wrapper/punica_cpu.py:349 -> vllm/lora/ops/torch_ops/lora_ops.py:78, 0.32.0).
        outputs = [llm.generate([p], params, lora_request=lora, use_tqdm=False)[0] for p in prompts]
        return torch.stack([_logprobs(o, vocab) for o in outputs])

    clock = time.monotonic()
    out = {"base": run(None)}
    groups = files.groups(adapter, serve_dir)
    requests = {"adapter": str(adapter), **{f"only:{g}": info["dir"] for g, info in groups.items()}}
    record["groups"] = {g: {k: v for k, v in info.items() if k != "dir"} for g, info in groups.items()}
    for n, (name, path) in enumerate(requests.items(), start=1):
        try:
            out[name] = run(LoRARequest(name.replace(":", "-"), n, path))
        except Exception as exc:  # vLLM refusing the adapter is the finding
            record.setdefault("refused", {})[name] = files.refusal(exc, "vllm")
    memory = request.get("memory")
    if memory:  # the adapter as verl's rollout sync hands it: tensors and verl's config, no file
        try:
            out["memory"] = _from_memory(llm, memory, len(requests) + 1, run)
        except Exception as exc:
            record.setdefault("refused", {})["memory"] = files.refusal(exc, "vllm")
    record["seconds"]["requests"] = round(time.monotonic() - clock, 2)
    save_file({k: v.contiguous() for k, v in out.items()}, str(serve_dir / "vllm.safetensors"))
    return record


def _from_memory(llm: Any, memory: dict[str, Any], lora_id: int, run: Any) -> Any:
    """Prompt log-probs with the streamed adapter loaded from tensors, as verl's rollout loads it.

    verl (0.9.1) adds a ``TensorLoRARequest`` (a ``LoRARequest`` carrying ``peft_config`` and ``lora_tensors``)
    through the worker's ``add_lora`` and replaces ``LRUCacheWorkerLoRAManager._load_adapter`` so that it
    builds the adapter with ``PEFTHelper.from_dict`` and ``LoRAModel.from_lora_tensors``
    (verl/utils/vllm/utils.py:31-118, verl/workers/rollout/vllm_rollout/utils.py:374-384); requests then name
    the adapter's id. Its module cannot be imported next to vLLM's CPU build, whose distribution is
    ``vllm-cpu``: ``version("vllm")`` is None and verl/third_party/vllm/__init__.py:35-37 raises. So the same
    calls are made here. verl calls the mapper's ``get_unstacked_mapper`` from vLLM 0.25 on; vLLM 0.29 renamed
    it ``get_rename_mapper`` (vllm/model_executor/models/utils.py:180 of 0.32.0, which its own ``_load_adapter``
    calls: vllm/lora/worker_manager.py:133-135), so verl's loader breaks there: the installed vLLM's is taken.
    """
    import msgspec
    from safetensors.torch import load_file
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    class TensorLoRARequest(LoRARequest):  # verl/utils/vllm/utils.py:31-33
        peft_config: dict = msgspec.field(default=None)
        lora_tensors: dict = msgspec.field(default=None)

    from_path = LRUCacheWorkerLoRAManager._load_adapter

    def _load_adapter(self: Any, lora_request: Any) -> Any:  # verl/utils/vllm/utils.py:39-106, for tensors
        if not isinstance(lora_request, TensorLoRARequest):
            return from_path(self, lora_request)
        peft_helper = PEFTHelper.from_dict(lora_request.peft_config)
        peft_helper.validate_legal(self.lora_config)
        mapper = getattr(self._adapter_manager.model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            mapper = (getattr(mapper, "get_unstacked_mapper", None) or mapper.get_rename_mapper)()
        return self._lora_model_cls.from_lora_tensors(
            tensors=lora_request.lora_tensors,
            peft_helper=peft_helper,
            lora_model_id=lora_request.lora_int_id,
            device="cpu",
            dtype=self.lora_config.lora_dtype,
            weights_mapper=mapper,
            model_vocab_size=self.vocab_size,
        )

    LRUCacheWorkerLoRAManager._load_adapter = _load_adapter
    tensors = load_file(memory["tensors"])
    placeholder = "in-memory"  # verl's VLLM_LORA_PATH: a LoRARequest must name a path
    llm.llm_engine.add_lora(
        TensorLoRARequest(
            lora_name="memory", lora_int_id=lora_id, lora_path=placeholder, peft_config=memory["peft_config"],
            lora_tensors=tensors,
        )
    )  # fmt: skip
    return run(LoRARequest("memory", lora_id, placeholder))


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":  # vLLM may start worker processes that import this file
    files.run_script("vllm", "vllm", serve)
