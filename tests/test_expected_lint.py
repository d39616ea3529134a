"""``matrix/expected.toml`` cannot absorb: no pattern is as wide as a sentence the harness writes for any cell.

An expectation is met only while every problem is one it names. A pattern that matches one of the
harness's generic sentences on its own ("Megatron logits differ from peft.PeftModel logits", an
aggregated header without its tensors) would cover any new problem of that check; one with ``.*``
spans from one sentence of a message to another (matched with DOTALL, across lines too), so its
words can be found anywhere. Each generic sentence is collected from the code: its fragments must
appear in ``compat/``, so the list follows the messages it stands for.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "matrix" / "expected.toml"

# (a generic sentence as a problem says it, bare or with made-up counts; the literal fragments of the
# code that write it). A sentence that names nothing of its cause: a pattern must say more than it.
GENERIC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the base models differ before any adapter: Megatron with its adapters off vs the HF model",
     ("the base models differ before any adapter: Megatron with its adapters off vs the HF model",)),
    ("the base models differ before any adapter: vllm vs Megatron",
     ("the base models differ before any adapter: {engine} vs Megatron",)),
    ("Megatron logits differ from peft.PeftModel logits", ("Megatron logits differ from peft.PeftModel logits",)),
    *(
        (f"{form} logits differ from peft.PeftModel logits", (f'"{form}"', "logits differ from peft.PeftModel logits"))
        for form in ("bridge's merged HF export (save_hf_weights)", "Megatron with adapters merged by the bridge",
                     "peft merge_and_unload")
    ),
    ("peft merge_and_unload", ('PEFT_MERGED = "peft merge_and_unload"',)),
    ("peft merge_and_unload's weights differ from the bridge's merged HF export in 3 of 39 tensors",
     ("peft merge_and_unload's weights differ from the bridge's merged HF export in {len(differ)} of ",)),
    ("peft.PeftModel.from_pretrained refused the export", ("peft.PeftModel.from_pretrained refused the export",)),
    ("the adapter does not change the logits beyond the tolerance",
     ("the adapter does not change the logits beyond the tolerance",)),
    ("the bridge's merged HF export (merge_adapter_weights=True) raised",
     ("the bridge's merged HF export (merge_adapter_weights=True)", "{what} raised")),
    ("the bridge's in-place merge raised", ("the bridge's in-place merge", "{what} raised")),
    ("3 tokens routed otherwise, not near-ties (margin <= 2 x drift <= noise)",
     ("tokens routed otherwise, not near-ties (margin <= 2 x drift <= noise)",)),
    ("routing flips: 3 tokens at layers 1", ("routing flips: {tokens} tokens at layers {layers}",)),
    ("adapter not restored:", ('"adapter not restored:"',)),
    # the per-module oracles' headers (compat/checks/oracles.py): their problems list every weight
    ("the exported delta, mapped into Megatron's layout by the bridge's import conversion, differs from "
     "Megatron's stored delta in 3 of 64 weights (fp32, up to 1e-05 of the largest delta allowed)",
     ("the exported delta, mapped into Megatron's layout by the bridge's import conversion, differs from ",
      "Megatron's stored delta in {len(differ)} of {len(merged)} weights ",
      "(fp32, up to {DELTA_RTOL:g} of the largest delta allowed)")),
    ("Megatron adapts 3 weights the export leaves unchanged, e.g. ",
     ("Megatron adapts {len(missing)} weights the export leaves unchanged, e.g. ",)),
    ("the export changes 3 weights Megatron does not adapt, e.g. ",
     ("the export changes {len(extra)} weights Megatron does not adapt, e.g. ",)),
    ("in flight, Megatron: 3 of 64 adapted weights add another contribution in the forward pass than their "
     "stored adapter's scale * x A^T B^T",
     ("{side}: {len(bad)} of {len(merged)} adapted weights add another contribution in the forward pass than ",
      "stored adapter's scale * x A^T B^T: ")),
    ("routing flips left 3 positions past each sequence's first compared",
     ("routing flips left {seen} positions past each sequence's first compared",)),
    # the aggregated headers of the file checks (their problems list every tensor: a pattern names them)
    ("the export has no adapter for 3 of the 64 modules targeted by ['linear_fc1']",
     ("the export has no adapter for {len(absent)} of the {len(wanted)} ",
      "modules targeted by {list(adapter.targets)}")),
    ("use_dora is set but 3 of 28 modules carry no lora_magnitude_vector "
     "(peft then re-initialises the magnitudes from the base weights)",
     ("use_dora is set but {len(no_magnitude)} of {len(modules)} modules carry no lora_magnitude_vector ",
      "(peft then re-initialises the magnitudes from the base weights)")),
    ("peft applied no LoRA to 3 modules that have tensors in the file",
     ("peft applied no LoRA to {len(dropped)} modules that have tensors in the file",)),
    ("peft found no value in the file for the LoRA of 3 modules (they keep their initial values)",
     ("peft found no value in the file for the LoRA of {len(unset)} modules (they keep their initial ",)),
    ("3 tensors of the file have no place a check can find in the model peft loaded",
     ("tensors of the file have no place a check can find in the model peft loaded",)),
    ("export after resharding has other tensors than at the save layout",
     ("export after resharding has other tensors than at the save layout: ",)),
    ("3 of 39 tensors differ from the export at the save layout",
     ("tensors differ from the export at the save layout, ",)),
    ("the export has adapters for 3 modules not targeted",
     ("the export has adapters for {len(stray)} modules not targeted",)),
)  # fmt: skip

# A wildcard that runs across sentences ("; ") and, under DOTALL, lines: an unescaped ``.`` repeated.
SPANNING = re.compile(r"(?<!\\)\.[*+]|\[\\s\\S\][*+]|\(\?s\)")


def _entries() -> list[dict]:
    return tomllib.loads(EXPECTED.read_text())["expect"]


def _patterns() -> list[tuple[str, str, bool]]:
    """(where, pattern, names tensors) of every pattern in the file."""
    out = []
    for i, entry in enumerate(_entries()):
        match = entry.get("match", [])
        for m in [match] if isinstance(match, (str, dict)) else match:
            where = f"[[expect]] #{i + 1} {entry['cells']}"
            out.append((where, m["problem"], True) if isinstance(m, dict) else (where, m, False))
    return out


def lint(patterns: list[tuple[str, str, bool]]) -> list[str]:
    """What is wrong with each pattern, as a line naming its entry."""
    out = []
    for where, pattern, names_tensors in patterns:
        if SPANNING.search(pattern):
            out.append(f"{where}: {pattern!r} spans sentences with .* (say [^;]* within one, or spell the text)")
        wide = [s for s, _ in GENERIC if re.search(pattern, s, re.DOTALL)]
        if wide and not names_tensors:
            out.append(f"{where}: {pattern!r} matches the generic {wide[0]!r} on its own: name the cause's text")
    return out


def test_each_generic_sentence_is_written_by_the_code() -> None:
    source = "\n".join(p.read_text() for p in sorted((ROOT / "compat").rglob("*.py")))
    missing = [(s, f) for s, fragments in GENERIC for f in fragments if f not in source]
    assert not missing, f"generic sentences whose code changed (update GENERIC): {missing}"


def test_every_expected_failure_names_its_problems() -> None:
    bare = [f"#{i + 1} {e['cells']}" for i, e in enumerate(_entries()) if e["status"] in ("fail", "error")
            and not e.get("match")]  # fmt: skip
    assert not bare, f"expected fail/error entries without a match (they would accept anything): {bare}"


def test_no_pattern_absorbs_what_a_generic_sentence_says() -> None:
    found = lint(_patterns())
    assert not found, f"{len(found)} patterns of matrix/expected.toml are too wide:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "pattern",
    [
        "(logits differ from peft\\.PeftModel logits|the base models differ before any adapter)",  # :23, :67
        "peft applied no LoRA to \\d+ modules|logits differ from peft\\.PeftModel logits|peft merge_and_unload",
        "the export has no adapter for \\d+ of the \\d+ modules targeted by .*mlp\\.experts\\.",  # DOTALL .*
        "refused the export: .*size mismatch",
    ],
)
def test_the_lint_rejects_what_the_issue_found(pattern: str) -> None:
    """The patterns issue 34 found in matrix/expected.toml (e9d89ed), each refused."""
    assert lint([("entry", pattern, False)])


def test_the_lint_lets_a_pattern_naming_its_cause_through() -> None:
    cause = "Megatron logits differ from peft\\.PeftModel logits: [^;]*; [^;]*; [^;]*; first divergence: layer 0 mlp"
    listed = "the export has no adapter for \\d+ of the \\d+ modules targeted by"
    assert lint([("entry", cause, False), ("entry", listed, True)]) == []
