"""pytest plugin (entry point ``pytest11``): matrix cells as tests, and fixtures to run them.

Thin on purpose: it reads options, parametrizes ``compat_cell`` from a matrix file, and calls
the library. Nothing heavy is imported at load time (torch and megatron only ever load in the
worker processes a cell launches), so installing the package costs other test suites nothing.

In a test module::

    def test_cell(compat_cell, compat_run):
        compat_run(compat_cell).assert_met()

Each cell becomes one test with the cell id as its id. A cell that ``matrix/expected.toml``
expects to ``fail`` is a strict xfail: when upstream fixes it, the test fails as XPASS and the
expectation must be updated. An expected ``unsupported`` cell is skipped with its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Light (standard library only); imported now so the fork server's baseline environment is the one
# pytest started with, not whatever the first test to launch a cell had patched in.
import compat.forkserver  # noqa: F401

if TYPE_CHECKING:
    from compat.cells import Cell
    from compat.expected import Expectations
    from compat.report import CellResult

__all__ = ["CellDidNotPass", "CellErrored", "CellFailed", "CompatRun"]


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
    parser.addini("compat_matrix", "matrix TOML whose cells become tests", default="matrix/ci.toml")


@dataclass(frozen=True)
class Settings:
    matrix: Path
    expected: Path
    backend: str
    timeout: float | None


def _settings(config: pytest.Config) -> Settings:
    root = Path(config.rootpath)
    matrix = config.getoption("--compat-matrix") or root / config.getini("compat_matrix")
    if not matrix.is_absolute():
        matrix = Path.cwd() / matrix
    expected = config.getoption("--compat-expected") or matrix.parent / "expected.toml"
    return Settings(
        matrix, expected, config.getoption("--compat-backend") or "auto", config.getoption("--compat-timeout")
    )


def _load(config: pytest.Config) -> tuple[list[Cell], Expectations, float | None]:
    """Matrix and expectations, read once per process; bad files stop collection with UsageError."""
    cached = getattr(config, "_compat_loaded", None)
    if cached is not None:
        return cached
    from compat.expected import ExpectedError, load_expectations
    from compat.matrix import MatrixError, load_matrix

    s = _settings(config)
    try:
        matrix = load_matrix(s.matrix)
        expectations = load_expectations(s.expected)
    except (MatrixError, ExpectedError) as exc:
        raise pytest.UsageError(f"megatron-lora-compat: {exc}") from None
    loaded = (list(matrix.cells), expectations, s.timeout or matrix.timeout)
    config._compat_loaded = loaded  # type: ignore[attr-defined]
    return loaded


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "compat_cell" not in metafunc.fixturenames:
        return
    from compat.versions import installed_versions

    cells, expectations, _ = _load(metafunc.config)
    versions = installed_versions()
    params = []
    for cell in cells:
        status, reason = expectations.status_for(cell.id, versions)
        marks: list[Any] = [pytest.mark.cell]
        if status == "fail":
            marks.append(pytest.mark.xfail(raises=CellFailed, strict=True, reason=reason))
        elif status == "error":
            marks.append(pytest.mark.xfail(raises=CellErrored, strict=True, reason=reason))
        params.append(pytest.param(cell, id=cell.id, marks=marks))
    metafunc.parametrize("compat_cell", params)


class CompatRun:
    """Runs cells with the session's backend, timeout and expectations (the ``compat_run`` fixture)."""

    def __init__(self, backend: str, timeout: float | None, expectations: Expectations, workdir: Path) -> None:
        self.backend, self.timeout, self.expectations, self.workdir = backend, timeout, expectations, workdir

    def __call__(self, cell: Cell, **kwargs: Any) -> CompatResult:
        from compat.launch import DEFAULT_TIMEOUT, run_cell
        from compat.versions import installed_versions

        expected = self.expectations.status_for(cell.id, installed_versions())
        timeout = kwargs.pop("timeout", None) or self.timeout or DEFAULT_TIMEOUT
        return CompatResult(run_cell(cell, self.backend, expected, timeout, workdir=self.workdir, **kwargs))


@dataclass(frozen=True)
class CompatResult:
    """A cell's result with assertions that raise the reason, as assert_close does."""

    result: CellResult

    def assert_met(self) -> None:
        """Pass if the cell passed; raise by observed status otherwise (xfail marks match on it)."""
        r = self.result
        if r.status == "pass":
            return
        if r.status == "unsupported":
            if r.expected == "unsupported":
                pytest.skip(f"{r.id}: {r.reason}")
            raise CellDidNotPass(f"{r.id} is unsupported here: {r.reason}")
        err = CellFailed if r.status == "fail" else CellErrored
        raise err(f"{r.id} {r.status}: {r.reason}")


@pytest.fixture(scope="session")
def compat_backend(pytestconfig: pytest.Config) -> str:
    backend = _settings(pytestconfig).backend
    if backend == "auto":
        from compat.backends import detect

        backend = detect()
    return backend


@pytest.fixture(scope="session")
def _compat_runner(
    pytestconfig: pytest.Config, compat_backend: str, tmp_path_factory: pytest.TempPathFactory
) -> CompatRun:
    from compat.expected import load_expectations

    s = _settings(pytestconfig)
    expectations = load_expectations(s.expected)
    return CompatRun(compat_backend, s.timeout, expectations, tmp_path_factory.mktemp("cells"))


@pytest.fixture
def compat_run(_compat_runner: CompatRun, request: pytest.FixtureRequest) -> Any:
    """Run a cell: ``compat_run(cell)`` returns a result with ``.result`` and ``.assert_met()``.

    Each result is also attached to the test's report, so ``--compat-results`` can collect them
    (on the xdist controller too).
    """

    def run(cell: Cell, **kwargs: Any) -> CompatResult:
        result = _compat_runner(cell, **kwargs)
        request.node.user_properties.append(("compat_result", asdict(result.result)))
        return result

    return run


_collected: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "compat_result" and report.when == "call":
            _collected.append(value)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the cells' results.json (CONTRACT shape) where --compat-results asks, from the controller."""
    path = session.config.getoption("--compat-results")
    if not path or hasattr(session.config, "workerinput") or not _collected:
        return
    from compat.report import CellResult, device_name, write_results
    from compat.versions import installed_versions

    backend = session.config.getoption("--compat-backend") or "cpu"
    if backend == "auto":
        from compat.backends import detect

        backend = detect()
    order = {c.id: i for i, c in enumerate(_load(session.config)[0])}
    results = sorted((CellResult(**r) for r in _collected), key=lambda r: (order.get(r.id, len(order)), r.id))
    write_results(Path(path), results, backend, device_name(backend), installed_versions())
