"""Installed versions of the stack under test, read from package metadata (no imports)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["MIN_BRIDGE", "PACKAGES", "StackError", "check_stack", "installed_versions"]

PACKAGES = ("torch", "megatron-core", "megatron-bridge", "transformers", "peft")


def installed_versions() -> dict[str, str | None]:
    """Version of each package under test; None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class StackError(ValueError):
    """The stack under test is missing or too old: refused before any worker starts."""


# save_hf_adapter, the export every cell checks, first appears in megatron-bridge 0.4.0.
MIN_BRIDGE = "0.4.0"


def check_stack(versions: dict[str, str | None] | None = None) -> None:
    from packaging.version import Version

    versions = versions or installed_versions()
    missing = [name for name, v in versions.items() if v is None]
    if missing:
        raise StackError(
            f"not installed: {', '.join(missing)}. The harness tests this stack; install the pinned "
            "set with `make venv` (requirements/cpu.lock) or your project's own pins."
        )
    bridge = versions["megatron-bridge"]
    assert bridge is not None
    if Version(bridge) < Version(MIN_BRIDGE):
        raise StackError(
            f"megatron-bridge {bridge} is too old: AutoBridge.save_hf_adapter, which every cell "
            f"exports with, first appears in {MIN_BRIDGE}"
        )
