"""Declarations as data: the built-in ones (``compat/data/*.toml``) plus the user's own files.

Families and adapter kinds are each declared in TOML, validated on load by their module's parser.
A user file (``--families FILE``, ``--adapters FILE``, a matrix's ``families_file``) is read with
the same parser and the same errors, and adds to the built-in declarations: its ``[defaults]``
overlay the built-in ones, and a name declared twice is bad input. The files in use travel to the
ranks with each task (:func:`files` / :func:`use`), so a rank sees what the caller saw.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from compat.declare.suggest import unknown_name

__all__ = ["Declarations", "files", "use"]

_KINDS: dict[str, Declarations[Any]] = {}


class Declarations[T]:
    """One kind of declaration (``family``, ``adapter``): built-in data plus added files."""

    def __init__(
        self,
        kind: str,
        plural: str,
        resource: str,
        parse: Callable[[dict[str, Any], str, dict[str, T]], dict[str, T]],
        error: type[ValueError],
        listed_by: str = "",
    ) -> None:
        self.kind, self.plural, self.resource, self.parse, self.error = kind, plural, resource, parse, error
        self.listed_by = listed_by  # the command that lists every name, for a refusal with nothing close
        self._files: list[Path] = []
        self._stamps: dict[Path, tuple[int, int]] = {}  # (mtime_ns, size) each file was read at
        self._cache: dict[str, T] | None = None
        _KINDS[kind] = self

    def _builtin(self) -> dict[str, Any]:
        return tomllib.loads(resources.files("compat.data").joinpath(self.resource).read_text())

    def all(self) -> dict[str, T]:
        """Every declaration by name, built-in first."""
        if self._cache is None:
            builtin = self._builtin()
            out = dict(self.parse(builtin, f"compat/data/{self.resource}", {}))
            for path in self._files:
                try:
                    self._stamps[path] = _stamp(path)
                    data = tomllib.loads(path.read_text())
                except (OSError, tomllib.TOMLDecodeError) as exc:
                    raise self.error(f"{path}: cannot be read as TOML: {exc}") from None
                data["defaults"] = {**builtin.get("defaults", {}), **data.get("defaults", {})}
                extra = self.parse(data, str(path), out)  # a file may build on what came before it
                clash = sorted(set(extra) & set(out))
                if clash:
                    raise self.error(f"{path}: {self.kind} {', '.join(map(repr, clash))} is already declared")
                out.update(extra)
            self._cache = out
        return self._cache

    def get(self, name: str) -> T:
        try:
            return self.all()[name]
        except KeyError:
            raise self.error(unknown_name(self.kind, self.plural, name, self.all(), self.listed_by)) from None

    def add_file(self, path: Path) -> None:
        """Add a user's file; validated now (:attr:`error` if malformed or clashing, and it is not added)."""
        path = Path(path).resolve()
        if path in self._files:
            # A file that grew since it was read (the shapes ``compat fuzz`` draws) is read again.
            if self._stamps.get(path) != _stamp(path):
                self._cache = None
                self.all()
            return
        if not path.is_file():
            raise self.error(f"{self.kind} declarations file {path} does not exist")
        self._files.append(path)
        self._cache = None
        try:
            self.all()
        except self.error:
            self._files.remove(path)
            self._cache = None
            raise

    @property
    def files(self) -> list[str]:
        return [str(p) for p in self._files]


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


def files() -> dict[str, list[str]]:
    """The user files in use, by kind (what a task carries to the ranks)."""
    return {kind: d.files for kind, d in _KINDS.items() if d.files}


def use(by_kind: dict[str, list[str]] | None) -> None:
    """Add the files a task names (in a rank); files already added are skipped.

    The kinds register when their modules load (``compat.declare.cells`` imports both): the caller imports
    them, so that this module, which they import, imports none of its clients.
    """
    unknown = sorted(set(by_kind or {}) - set(_KINDS))
    if unknown:
        raise KeyError(f"declaration kinds {unknown} are not loaded; import compat.declare.cells before use()")
    for kind, paths in (by_kind or {}).items():
        for path in paths:
            _KINDS[kind].add_file(Path(path))
