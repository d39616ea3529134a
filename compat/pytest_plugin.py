"""pytest plugin (entry point ``pytest11``): matrix cells as tests, and fixtures to run them.

Thin on purpose: it reads options, parametrizes ``compat_cell`` from a matrix file, and calls the
library (``compat.run_cell``). Nothing heavy is imported at load time (torch and megatron only ever
load in the rank processes a cell launches), so installing the package costs other test suites
nothing. In a test module::

    def test_cell(compat_cell, compat_run):
        compat_run(compat_cell).assert_met()

Each cell becomes one test with the cell id as its id. A cell that the expected outcomes say will
``fail`` (or ``error``) is a strict xfail. ``assert_met`` decides on its own, mark or no mark (a test
that takes its cells elsewhere, ``--runxfail``): a cell that passes where it was expected to fail is
unmet, and the test fails saying so, so the expectation must be updated. An expected ``unsupported``
cell is skipped with its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Light (standard library only); imported now so the fork server's baseline environment is the one
# pytest started with, not whatever the first test to launch a cell had patched in.
import compat.launch.forkserver  # noqa: F401

if TYPE_CHECKING:
    from collections.abc import Callable

    from compat.declare.cells import Cell
    from compat.declare.expected import Expectations
    from compat.declare.plugins import Plugins
    from compat.results.record import CellResult

__all__ = ["CellDidNotPass", "CellErrored", "CellFailed", "CompatResult", "CompatRunner"]

ROLES = ("exporter", "saver", "loader")


class CellDidNotPass(AssertionError):
    """A cell's observed status is not ``pass``; the message is the cell's reason."""


class CellFailed(CellDidNotPass):
    """A check failed (status ``fail``)."""


class CellErrored(CellDidNotPass):
    """The run broke: a rank crashed, hung or timed out (status ``error``)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("megatron-lora-compat", "LoRA adapter round-trip matrix")
    group.addoption("--compat-matrix", type=Path, help="matrix TOML whose cells become tests (ini: compat_matrix)")
    group.addoption("--compat-expected", type=Path, help="expected outcomes (default: expected.toml beside the matrix)")
    group.addoption("--compat-backend", choices=("auto", "cpu", "cuda"), default=None, help="where ranks run")
    group.addoption("--compat-timeout", type=float, default=None, help="seconds per cell launch")
    group.addoption("--compat-results", type=Path, default=None, help="write the cells' results.json here")
    group.addoption("--compat-families", type=Path, help="your family declarations (ini: compat_families)")
    group.addoption("--compat-adapters", type=Path, help="your adapter declarations (ini: compat_adapters)")
    parser.addini("compat_matrix", "matrix TOML whose cells become tests (none: no compat_cell tests)", default="")
    parser.addini("compat_families", "your family declarations (TOML)", default="")
    parser.addini("compat_adapters", "your adapter declarations (TOML)", default="")
    for role in ROLES:
        group.addoption(f"--compat-{role}", help=f"your {role}, 'package.module:function' (ini: compat_{role})")
        parser.addini(f"compat_{role}", f"your {role}, 'package.module:function'", default="")


@dataclass
class Session:
    """What the plugin knows in one pytest process: read once, per session (``config.stash``)."""

    cells: list[Cell]
    expectations: Expectations
    timeout: float | None
    plugins: Plugins
    backend_option: str
    results: list[dict[str, Any]] = field(default_factory=list)
    _backend: str | None = None

    @property
    def backend(self) -> str:
        """``auto`` resolved once (imports torch: not at load time)."""
        if self._backend is None:
            from compat.rank.backends import resolve

            self._backend = resolve(self.backend_option)
        return self._backend


_SESSION = pytest.StashKey[Session]()


def _path(config: pytest.Config, option: str, ini: str) -> Path | None:
    value = config.getoption(option) or config.getini(ini)
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else Path(config.rootpath) / path


def _session(config: pytest.Config) -> Session:
    """Declarations, matrix, expectations and plugins, read once; bad input stops with UsageError."""
    if _SESSION in config.stash:
        return config.stash[_SESSION]
    from compat.declare.adapters import add_adapters
    from compat.declare.expected import load_expectations
    from compat.declare.families import add_families
    from compat.declare.matrix import load_matrix
    from compat.declare.plugins import Plugins

    matrix_path = _path(config, "--compat-matrix", "compat_matrix")
    try:
        for option, ini, add in (("--compat-families", "compat_families", add_families),
                                 ("--compat-adapters", "compat_adapters", add_adapters)):  # fmt: skip
            path = _path(config, option, ini)
            if path is not None:
                add(path)
        matrix = load_matrix(matrix_path) if matrix_path else None
        expected = config.getoption("--compat-expected") or (
            matrix_path.parent / "expected.toml" if matrix_path else None
        )
        expectations = load_expectations(expected)
        named = {r: config.getoption(f"--compat-{r}") or config.getini(f"compat_{r}") for r in ROLES}
        base = matrix.plugins.named() if matrix else {}
        plugins = Plugins(**{**base, **{r: v for r, v in named.items() if v}})
    except ValueError as exc:
        raise pytest.UsageError(f"megatron-lora-compat: {exc}") from None
    session = Session(
        cells=list(matrix.cells) if matrix else [],
        expectations=expectations,
        timeout=config.getoption("--compat-timeout") or (matrix.timeout if matrix else None),
        plugins=plugins,
        backend_option=config.getoption("--compat-backend") or "auto",
    )
    config.stash[_SESSION] = session
    return session


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cell: a matrix cell (launches rank processes)")
    session = _session(config)  # bad files and plugin names stop the run here, as usage errors
    if session.plugins.named():
        from compat.declare.plugins import PluginError, check

        try:
            check(session.plugins, session.backend)
        except PluginError as exc:
            raise pytest.UsageError(f"megatron-lora-compat: {exc}") from None
    if any(cell.serve for cell in session.cells):  # a cell no engine can serve here is bad input
        from compat.declare.pin_sets import GateError
        from compat.serving import check_servable

        try:
            for cell in session.cells:
                check_servable(cell, session.backend)
        except (GateError, ValueError) as exc:
            raise pytest.UsageError(f"megatron-lora-compat: {exc}") from None
    path = config.getoption("--compat-results")
    if path:
        from compat.commands.pytest_results import ResultsCollector

        config.pluginmanager.register(ResultsCollector(config, Path(path), _session), "compat-results-collector")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "compat_cell" not in metafunc.fixturenames:
        return
    from compat.declare.versions import installed_versions

    session = _session(metafunc.config)
    versions = installed_versions()
    params = []
    for cell in session.cells:
        expected = session.expectations.for_cell(cell.id, versions, cell.spec)
        marks: list[Any] = [pytest.mark.cell]
        if expected.status == "fail":
            marks.append(pytest.mark.xfail(raises=CellFailed, strict=True, reason=expected.reason))
        elif expected.status == "error":
            marks.append(pytest.mark.xfail(raises=CellErrored, strict=True, reason=expected.reason))
        params.append(pytest.param(cell, id=cell.id, marks=marks))
    metafunc.parametrize("compat_cell", params)


@dataclass(frozen=True)
class CompatResult:
    """A cell's result (``.result``, a :class:`compat.CellResult`) with an assertion that raises its reason."""

    result: CellResult

    def assert_met(self) -> None:
        """Return if the cell passed as expected; raise by observed status otherwise.

        A pass returns only when a pass was expected: a pass expected to fail, error or be unsupported
        raises :class:`CellDidNotPass` (not what an xfail mark matches on, so the test fails, with the
        mark, without it and under ``--runxfail``); an expected ``unsupported`` skips; a
        ``fail``/``error`` raises :class:`CellFailed`/:class:`CellErrored` (what strict xfail marks
        match on); an expected failure with other problems than expected raises
        :class:`CellDidNotPass`, naming them.
        """
        r = self.result
        if r.status == "pass":
            if r.expected == "pass":
                return
            raise CellDidNotPass(f"{r.id} passed, but is expected {r.expected}: {r.expected_reason}")
        if r.status == "unsupported":
            if r.met:
                pytest.skip(f"{r.id}: {r.reason}")
            raise CellDidNotPass(f"{r.id} is unsupported here: {r.reason}")
        if r.status == r.expected and not r.met:
            raise CellDidNotPass(
                f"{r.id} {r.status} as expected, but not with the expected problems:\n"
                + "\n".join(f"  {u}" for u in r.unmet)
                + f"\n{r.reason}"
            )
        err = CellFailed if r.status == "fail" else CellErrored
        raise err(f"{r.id} {r.status}: {r.reason}")


class CompatRunner:
    """The ``compat_run`` fixture: ``compat_run(cell, exporter=..., saver=..., loader=..., timeout=...)``;
    a plugin is a ``"package.module:function"`` name or a module-level function."""

    def __init__(self, session: Session, workdir: Path, node: pytest.Item) -> None:
        self.session, self.workdir, self.node = session, workdir, node

    def __call__(
        self,
        cell: Cell,
        *,
        exporter: str | Callable[..., None] | None = None,
        saver: str | Callable[..., None] | None = None,
        loader: str | Callable[..., None] | None = None,
        timeout: float | None = None,
    ) -> CompatResult:
        from compat.declare.plugins import PluginError, Plugins, check, plugin_name
        from compat.declare.versions import installed_versions
        from compat.launch.launcher import DEFAULT_TIMEOUT, run_cell

        s = self.session
        try:
            chosen = {"exporter": exporter, "saver": saver, "loader": loader}
            given = {role: plugin_name(v, role) for role, v in chosen.items() if v}
            plugins = Plugins(**{**s.plugins.named(), **given})
            check(plugins, s.backend)
        except PluginError as exc:
            raise pytest.UsageError(f"megatron-lora-compat: {exc}") from None
        expected = s.expectations.for_cell(cell.id, installed_versions(), cell.spec)
        result = run_cell(
            cell, s.backend, expected, timeout or s.timeout or DEFAULT_TIMEOUT, workdir=self.workdir, plugins=plugins
        )
        self.node.user_properties.append(("compat_result", asdict(result)))
        return CompatResult(result)


@pytest.fixture(scope="session")
def compat_backend(pytestconfig: pytest.Config) -> str:
    """The backend cells run on here (``--compat-backend``, ``auto`` resolved)."""
    return _session(pytestconfig).backend


@pytest.fixture
def compat_run(
    pytestconfig: pytest.Config, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> CompatRunner:
    """Run a cell with the session's backend, timeout, expectations and plugins; returns a :class:`CompatResult`.

    Each result is also attached to the test's report, so ``--compat-results`` collects them (on
    the xdist controller too). Files of cells that miss their expected outcome are kept under
    pytest's temporary directory, named in the result.
    """
    workdir = tmp_path_factory.getbasetemp() / "cells"
    workdir.mkdir(exist_ok=True)
    return CompatRunner(_session(pytestconfig), workdir, request.node)
