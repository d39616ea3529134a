"""Last known status per family and layout: the newest committed results, else expected.toml."""

from __future__ import annotations

import json
from pathlib import Path

from compat.expected import load_expectations
from compat.versions import installed_versions

__all__ = ["RESULTS_DIR", "last_known"]

RESULTS_DIR = Path("matrix/results")


def last_known(results_dir: Path = RESULTS_DIR) -> dict[str, str]:
    """family -> ``"tp1 pass, ep2 fail (expected), ..."`` from the newest results file per backend."""
    per_family: dict[str, dict[str, str]] = {}
    runs = [(path, json.loads(path.read_text())) for path in sorted(results_dir.glob("*.json"))]
    # Newest last, so newer results overwrite older ones: by the time a run finished (a clone's
    # file times are all the same), files from before that field by modification time.
    runs.sort(key=lambda run: (run[1].get("finished_at", ""), run[0].stat().st_mtime))
    for path, data in runs:
        for cell in data.get("cells", []):
            note = "" if cell["met"] else " (unexpected)"
            if cell["status"] != "pass" and cell["met"]:
                note = " (expected)"
            label = cell["id"].split(".", 1)[1]
            per_family.setdefault(cell["family"], {})[label] = f"{cell['status']}{note} [{path.stem}]"
    expectations = load_expectations(Path("matrix/expected.toml"))
    versions = installed_versions()
    out = {}
    for family, cells in per_family.items():
        out[family] = ", ".join(f"{k} {v}" for k, v in sorted(cells.items()))
    for entry in expectations.entries:
        for pattern in entry.cells:
            family = pattern.split(".", 1)[0]
            if family in out or "*" in family:
                continue
            if entry.matches(pattern, versions):
                out[family] = f"expected {entry.status}: {entry.reason}"
    return out
