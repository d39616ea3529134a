"""``compat fuzz``: the ci profile searches the core families with no new failure, and finds and shrinks a
fault that only some shapes show (``q_width_not_hidden``), in fp32 and in bf16.

The profile is ``--compat-fuzz PROFILE`` (or ``--hypothesis-profile``), ``ci`` by default: ``make test``
runs it. The planted searches use no example database, so what they find they found by searching.
"""

from __future__ import annotations

import pytest
from faults.catalogue import by_name
from test_faults import plant, unmatched

from compat.commands.fuzz import CORE, PROFILES, Search
from compat.declare.families import get_family

pytestmark = pytest.mark.cell


@pytest.fixture
def profile(request: pytest.FixtureRequest) -> str:
    chosen = request.config.getoption("--compat-fuzz")
    hypothesis_profile = request.config.getoption("hypothesis_profile", default=None)
    return chosen or (hypothesis_profile if hypothesis_profile in PROFILES else "ci")


def search(profile: str, families: tuple[str, ...], out, backend: str, **kwargs) -> Search:
    p = PROFILES[profile]
    return Search(families, profile, p.examples, p.budget, p.seed, out, backend=backend, **kwargs)


@pytest.mark.xdist_group("fuzz")
def test_profile_finds_no_new_failure(profile, tmp_path, compat_backend):
    s = search(profile, CORE, tmp_path, compat_backend)
    failures = s.run()
    assert s.tried, "the search ran no cell"
    assert not failures, "\n".join(f"{f.result.id}: {f.result.reason}" for f in failures)


@pytest.mark.xdist_group("q_width_not_hidden")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shape_fault_is_found_and_shrunk(dtype, profile, monkeypatch, tmp_path, compat_backend):
    fault = by_name("q_width_not_hidden")
    plant(monkeypatch, fault.name)
    # The shape is what is searched: one rank, one adapter kind, the dtype given.
    s = search(profile, (fault.family,), tmp_path, compat_backend, dtypes=(dtype,), adapters=("lora",), max_world=1,
               database=None)  # fmt: skip
    failures = s.run()
    assert len(failures) == 1, [f.result.id for f in failures] or "the planted fault was not found"
    drawn, result = failures[0].drawn, failures[0].result
    assert not unmatched(fault, result.reason, dtype), result.reason
    config = {**get_family(fault.family).config, **drawn.overrides}
    # Shrunk to the smallest cell: one key off the declared family, and the fault's condition.
    assert len(drawn.overrides) == 1, drawn.overrides
    assert config["num_attention_heads"] * config["head_dim"] != config["hidden_size"], drawn.overrides
    assert any(t["overrides"] == {} and t["status"] == "pass" for t in s.tried), "not shown to pass as declared"
    assert any(t["shrinking"] for t in s.tried), "never shrunk"
