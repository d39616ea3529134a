"""How run faults are planted: a rank that raises or hangs, upstream code that raises.

They break the run itself rather than the adapter (tests/test_run_faults.py drives them); like
``tamper.py``, everything here runs inside a rank.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from faults.tamper import Wrap


def conversion_raises(original: Callable[..., Any]) -> Callable[..., Any]:
    """HF -> Megatron weight conversion raises, as a conversion regression would."""

    @functools.wraps(original)
    def load_weights_hf_to_megatron(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("planted fault: 'NoneType' object has no attribute 'megatron_module'")

    return load_weights_hf_to_megatron


def raising(make: Callable[[], BaseException]) -> Wrap:
    """The wrapped upstream function raises ``make()`` instead of running, as a regression would."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            raise make()

        return wrapper

    return wrap


def internal_module_missing() -> BaseException:
    """A module inside the installed megatron-bridge that fails to import (a packaging regression)."""
    name = "megatron.bridge.models.planted_missing"
    return ModuleNotFoundError(f"planted fault: No module named {name!r}", name=name)


def spec_regression() -> BaseException:
    """A TypeError in a spec builder that has nothing to do with Transformer Engine being absent."""
    return TypeError("planted fault: get_gpt_layer_with_transformer_engine_spec() got an unexpected keyword")


def only_rank(rank: int, action: Callable[[], None]) -> Wrap:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if int(os.environ.get("RANK", "0")) == rank:
                action()
            return original(*args, **kwargs)

        return wrapper

    return wrap


def on_import_in_rank(rank: int, action: Callable[[], None]) -> Wrap:
    """Run ``action`` in ``rank`` while the module is being imported (the hook's empty path)."""

    def wrap(module: Any) -> Any:
        if int(os.environ.get("RANK", "-1")) == rank:
            action()
        return module

    return wrap


def planted_raise() -> None:
    raise RuntimeError("planted fault: rank 1 raises in save_hf_adapter")


def planted_hang_forever() -> None:
    while True:
        time.sleep(3600)
