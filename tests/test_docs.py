"""The reference pages are checked against the code they describe: every command-line option, every key the
matrix, expectation and declaration parsers accept, every results.json field, every pytest option and
fixture, every public name. And the docs hold together: links resolve, and no page narrates runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REF = DOCS / "reference"

# Pages that may be linked before they exist, and pages allowed to narrate runs: none.
NOT_YET: set[str] = set()
NARRATES: set[str] = set()


def _section(page: Path, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## ``."""
    text = page.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from compat.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_of_every_command_is_in_the_cli_reference(command: str) -> None:
    section = _section(REF / "cli.md", f"compat {command}")
    parser = _subcommands()[command]
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.dest]
        if not any(re.search(rf"`[^`]*{re.escape(n)}\b", section) for n in names):
            missing.append("/".join(names))
    assert not missing, f"docs/reference/cli.md, 'compat {command}', lacks {missing}"


def _keys_documented(page: Path, keys: set[str]) -> list[str]:
    text = page.read_text()
    return sorted(k for k in keys if f"`{k}`" not in text)


def test_every_matrix_key_is_in_the_matrix_reference() -> None:
    from compat.declare.matrix import _BLOCK_KEYS, _TOP_KEYS

    assert not _keys_documented(REF / "matrix.md", _TOP_KEYS | _BLOCK_KEYS)


def test_every_expectation_key_is_in_the_expectations_reference() -> None:
    from compat.declare.expected import _KEYS, STATUSES
    from compat.declare.versions import PACKAGES

    assert not _keys_documented(REF / "expectations.md", set(_KEYS) | set(STATUSES) | set(PACKAGES))


def test_every_family_and_adapter_key_is_in_the_declarations_reference() -> None:
    from compat.declare.adapters import _KEYS as ADAPTER_KEYS
    from compat.declare.adapters import adapters
    from compat.declare.families import _FAMILY_KEYS

    page = REF / "declarations.md"
    assert not _keys_documented(page, set(_FAMILY_KEYS) | set(ADAPTER_KEYS))
    assert not _keys_documented(page, {"suffix", "seed", "families", "config"})  # a profile's
    assert not _keys_documented(page, set(adapters())), "a shipped adapter kind is not named"


def test_every_results_field_is_in_the_results_reference(tmp_path: Path) -> None:
    import json

    from compat.results.record import CellResult, write_results

    out = tmp_path / "r.json"
    write_results(out, [], "cpu", "here", {}, True, {})
    top = set(json.loads(out.read_text())) - {"cells"}
    fields = set(CellResult.__dataclass_fields__)
    assert not _keys_documented(REF / "results.md", top | fields)


def test_every_pytest_option_ini_key_and_fixture_is_in_the_pytest_reference() -> None:
    from compat import pytest_plugin

    names: list[str] = []

    class Group:
        def addoption(self, *opts: str, **_: object) -> None:
            names.extend(opts)

    class Parser:
        def getgroup(self, *_: object) -> Group:
            return Group()

        def addini(self, name: str, *_: object, **__: object) -> None:
            names.append(name)

    pytest_plugin.pytest_addoption(Parser())  # type: ignore[arg-type]
    fixtures = ["compat_cell", "compat_run", "compat_backend"]
    text = (REF / "pytest.md").read_text()
    assert not [n for n in names + fixtures if f"`{n}" not in text]


def test_every_public_name_is_in_the_api_reference() -> None:
    import compat
    from compat import pytest_plugin

    text = (REF / "api.md").read_text()
    assert not [n for n in [*compat.__all__, *pytest_plugin.__all__] if f"`{n}" not in text]


def _pages() -> list[Path]:
    return sorted([*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "matrix" / "results" / "README.md"])


def test_every_link_between_pages_resolves() -> None:
    broken = []
    for page in _pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and path.name not in NOT_YET:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_every_docs_path_the_repository_names_exists() -> None:
    """Code, matrices, scripts and tests point people at docs pages: those pages exist."""
    sources = [*ROOT.glob("compat/**/*"), *ROOT.glob("matrix/**/*.toml"), *ROOT.glob("scripts/*")]
    sources += [*ROOT.glob("tests/**/*.py"), *ROOT.glob("examples/**/*"), ROOT / "Makefile", ROOT / "pyproject.toml"]
    named = []
    for path in sources:
        if path.is_file() and path.suffix not in (".json", ".png", ".pyc"):
            named += [(path, m) for m in re.findall(r"docs/[\w/.-]+\.(?:md|png)", path.read_text(errors="ignore"))]
    missing = [f"{p.relative_to(ROOT)}: {m}" for p, m in named if not (ROOT / m).exists()]
    missing = [m for m in missing if Path(m.split(": ")[1]).name not in NOT_YET]
    assert not missing


_DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b(?![\w{},.-]*\.json)")  # a date, not inside a results file's name
_NARRATION = re.compile(
    r"\b(this session|in that session|device time|lease|next session|the next run should|not run yet|as run|"
    r"was run|we ran|yesterday)\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("page", [p.relative_to(DOCS) for p in DOCS.rglob("*.md")], ids=str)
def test_no_page_narrates_runs(page: Path) -> None:
    """Documentation says how things are; dated runs are in matrix/results/ and CHANGELOG.md."""
    if str(page) in NARRATES:
        pytest.skip(f"docs/{page} is being rewritten elsewhere")
    text = (DOCS / page).read_text()
    found = [m.group(0) for m in [*_DATED.finditer(text), *_NARRATION.finditer(text)]]
    assert not found, f"docs/{page} narrates runs: {found}"
