"""Fault-suite summary: how many planted faults ran, and how many the harness caught; the fuzz profiles."""

from __future__ import annotations

import pytest

from compat.commands.fuzz import PROFILES, register_profiles

register_profiles()  # before Hypothesis's plugin loads --hypothesis-profile (ci, nightly)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("megatron-lora-compat").addoption(
        "--compat-fuzz",
        choices=sorted(PROFILES),
        help="the profile tests/test_fuzz.py searches with (default: --hypothesis-profile if it names one, else ci)",
    )


_faults: dict[str, tuple[bool, str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    props = dict(report.user_properties)
    if "fault" in props:
        _faults[props["fault"]] = (bool(props.get("caught")), str(props.get("message", "")))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _faults:
        return
    tr = terminalreporter
    tr.section("planted faults")
    for name, (caught, message) in sorted(_faults.items()):
        first = message.replace("\n", " ")[:150]
        tr.write_line(f"{name:24} {'caught' if caught else 'MISSED':7} {first}")
    caught = sum(c for c, _ in _faults.values())
    tr.write_line(f"faults planted: {len(_faults)}, faults caught: {caught}")
