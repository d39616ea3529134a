"""Where an exception came from: the upstream packages under test, or not.

A cell's reason names the upstream file and line at fault (``megatron/bridge/peft/utils.py:2471``),
relative to wherever the package is installed (a venv, a ``--target`` directory on the GPU image),
and the one line of the message that says what went wrong. Whatever is written (a reason, a
traceback) names files relative to their root (:func:`relative_paths`): results from one machine
read the same on another, and carry no developer's directories.
"""

from __future__ import annotations

import functools
import importlib.util
import sysconfig
import traceback
from pathlib import Path

__all__ = [
    "HARNESS_ROOT",
    "UPSTREAM_PACKAGES",
    "describe",
    "first_line",
    "relative_paths",
    "upstream_frame",
    "upstream_frames",
    "upstream_path",
]

UPSTREAM_PACKAGES = ("megatron", "transformers", "peft", "torch", "safetensors", "transformer_engine")

# The directory holding the ``compat`` package (and matrix/, tests/ beside it in a checkout); as many
# levels up as this module is deep, so that it holds wherever the module lives in the package.
HARNESS_ROOT = Path(__file__).resolve().parents[__name__.count(".")]


@functools.cache
def _roots() -> tuple[Path, ...]:
    """Directories holding the upstream packages, wherever they are installed."""
    roots = set()
    for name in UPSTREAM_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            roots.add(Path(location).resolve().parent)
    return tuple(sorted(roots))


def upstream_path(filename: str) -> str | None:
    """``megatron/core/...py`` for a file of an upstream package, None for any other file."""
    path = Path(filename).resolve()
    for root in _roots():
        if path.is_relative_to(root) and path.relative_to(root).parts[0] in UPSTREAM_PACKAGES:
            return path.relative_to(root).as_posix()
    return None


@functools.cache
def _prefixes() -> tuple[str, ...]:
    """Absolute directories a written path is made relative to, longest first (site-packages before the venv)."""
    paths = sysconfig.get_paths()
    # As given and resolved: a file is named by the path it was imported from (a venv reached
    # through a symlink inside the checkout, say), which may not be its real path.
    given = {HARNESS_ROOT, *_roots(), *(Path(paths[k]) for k in ("stdlib", "purelib", "platlib"))}
    found = given | {p.resolve() for p in given}
    return tuple(sorted((f"{p}/" for p in found), key=len, reverse=True))


def relative_paths(text: str) -> str:
    """``text`` with every file under the harness, an upstream package or the standard library named
    relative to its root (``compat/rank/worker.py``, ``megatron/bridge/peft/lora.py``, ``threading.py``)."""
    for prefix in _prefixes():
        text = text.replace(prefix, "")
    return text


def upstream_frames(exc: BaseException) -> list[str]:
    """``file:line`` of every upstream frame of the traceback, outermost first."""
    return [
        f"{path}:{f.lineno}"
        for f in traceback.extract_tb(exc.__traceback__)
        if (path := upstream_path(f.filename)) is not None
    ]


def upstream_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame in upstream code."""
    frames = upstream_frames(exc)
    return frames[-1] if frames else "unknown location"


def first_line(exc: BaseException, limit: int = 300, lines: int = 1) -> str:
    """The first line(s) of the message, joined by "; " (the rest is usually a stack or a dump)."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(text[:lines])[:limit]


def describe(exc: BaseException) -> str:
    """``TypeError: message at megatron/bridge/peft/utils.py:2471``: what a reason says of an exception."""
    return f"{type(exc).__name__}: {first_line(exc)} at {upstream_frame(exc)}"
