"""Run faults: a rank raises or hangs, upstream code raises where it used to be taken for a missing
component (tests/test_run_faults.py): the cell must end ``error`` naming the rank and the frame."""

from __future__ import annotations

from faults import disrupt
from faults.fault import Fault
from faults.targets import AUTO_BRIDGE, GPT_SPECS, MODEL_BRIDGE

__all__ = ["RUN_FAULTS"]

RUN_FAULTS: tuple[Fault, ...] = (
    Fault(
        "conversion_raises",
        "HF -> Megatron weight conversion raises an AttributeError (a regression, not a missing component)",
        "llama",
        "tp1",
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", disrupt.conversion_raises),),
        (r"^rank 0 raised AttributeError: planted fault", r"in load_weights_hf_to_megatron"),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "bridge_module_missing",
        "a module inside megatron-bridge fails to import while the model is built (an error, not 'unsupported: "
        "needs the package megatron.bridge.models...')",
        "llama",
        "tp1",
        (
            (
                MODEL_BRIDGE,
                "MegatronModelBridge.load_weights_hf_to_megatron",
                disrupt.raising(disrupt.internal_module_missing),
            ),
        ),
        (
            r"^rank 0 raised ModuleNotFoundError: planted fault: "
            r"No module named 'megatron\.bridge\.models\.planted_missing'",
        ),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "te_spec_builder_raises",
        "the TE layer spec a family's spec builds on raises a TypeError unrelated to TE being absent (an error, "
        "not 'unsupported: needs transformer_engine')",
        "minimax_m2",
        "tp1",
        ((GPT_SPECS, "get_gpt_layer_with_transformer_engine_spec", disrupt.raising(disrupt.spec_regression)),),
        (r"^rank 0 raised TypeError: planted fault: get_gpt_layer_with_transformer_engine_spec\(\)",),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "rank1_raises",
        "rank 1 raises in save_hf_adapter",
        "llama",
        "tp=2",
        ((AUTO_BRIDGE, "AutoBridge.save_hf_adapter", disrupt.only_rank(1, disrupt.planted_raise)),),
        (r"rank 1 raised RuntimeError: planted fault", r"Traceback", r"in planted_raise"),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "rank1_hangs",
        "rank 1 sleeps forever while importing megatron.core (early, so a short timeout still finds it)",
        "llama",
        "tp=2",
        (("megatron.core", "", disrupt.on_import_in_rank(1, disrupt.planted_hang_forever)),),
        (r"timed out after \d+s", r"rank 1 was killed by signal SIGKILL", r"in planted_hang_forever"),
        kind="run",
        status="error",
        timeout=60,
        dtypes=("fp32",),
    ),
)
