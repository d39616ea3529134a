"""The README's figures are the code's: each matrix's cell count, the tolerances, the adapter-effect floor,
the two commands. A change to a matrix or a bound that leaves the README behind fails here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# A matrix row of the README's table: | `matrix/NAME.toml` | CELLS | what |
_ROW = re.compile(r"^\| `(matrix/[\w./-]+\.toml)` \| (\d+) \|", re.MULTILINE)


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    """Cells of every matrix the README names, expanded by compat.declare.matrix in a process of its own
    (a matrix's families_file adds declarations for the rest of the process)."""
    named = sorted(set(re.findall(r"`(matrix/[\w./-]+\.toml)`", README)) - {"matrix/expected.toml"})
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom compat.declare.matrix import load_matrix\n"
        "print(json.dumps({p: len(load_matrix(Path(p)).cells) for p in sys.argv[1:]}))"
    )
    out = subprocess.run([sys.executable, "-c", code, *named], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_every_matrix_row_counts_the_matrix_cells(counts: dict[str, int]) -> None:
    rows = _ROW.findall(README)
    assert len(rows) >= 10, "the README's matrix table moved: update _ROW"
    wrong = {path: (int(n), counts[path]) for path, n in rows if counts[path] != int(n)}
    assert not wrong, f"README cell counts (README, actual): {wrong}"


def test_every_cell_count_in_the_prose_is_a_matrix_count(counts: dict[str, int]) -> None:
    """Outside the table, a "N cells" figure names what it counts: `make matrix` is matrix/ci.toml."""
    prose = _ROW.sub("", README)
    for line in prose.splitlines():
        for n in re.findall(r"\((\d+) cells\)", line):
            if "make matrix" in line:
                assert int(n) == counts["matrix/ci.toml"], line
            else:
                named = re.findall(r"`(matrix/[\w./-]+\.toml)`", line)
                assert named and int(n) == sum(counts[p] for p in named), line


def test_the_floor_and_the_tolerances_are_the_ones_compare_applies() -> None:
    from compat.checks.compare import EFFECT_MIN_SHARE, TOLERANCES

    share = {0.5: "half", 0.25: "a quarter", 0.75: "three quarters"}[EFFECT_MIN_SHARE]
    assert f"at least {share} of the logits must move beyond the tolerance" in README
    fp32, bf16 = TOLERANCES["fp32"], TOLERANCES["bf16"]
    assert fp32.rtol == 0 and f"fp32: {fp32.atol:.0e}".replace("e-0", "e-") in README
    assert bf16.atol == bf16.rtol and f"bf16: {bf16.atol:.0e} absolute and relative".replace("e-0", "e-") in README


def test_the_two_commands_are_make_targets_and_make_test_type_checks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "    make matrix" in README and "    make test" in README
    assert re.search(r"^matrix: .*\n\t\$\(PY\) -m compat run --matrix matrix/ci\.toml", makefile, re.MULTILINE)
    assert re.search(r"^test: .*\btypecheck\b", makefile, re.MULTILINE)
    assert re.search(r"^typecheck: .*\n\t\$\(PY\) -m mypy$", makefile, re.MULTILINE)
