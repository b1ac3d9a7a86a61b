"""Several URLs per color, judged by a quorum, against real upstreams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guardd.core import Outcome
from guardd.probes import HttpProber, ProbeSpec
from guardd.probes.http import Quorum
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.anyio


@pytest.fixture
def three() -> Iterator[list[Upstream]]:
    """Three backends of one color: two pass, one answers 503."""
    ups = [Upstream("green").start() for _ in range(3)]
    ups[2].set_mode("http_503")
    yield ups
    for u in ups:
        u.stop()


@pytest.mark.parametrize(
    ("quorum", "outcome"),
    [
        ("all", Outcome.HTTP_5XX),
        ("majority", Outcome.OK),
        ("any", Outcome.OK),
    ],
)
async def test_quorum_judges_a_round(
    three: list[Upstream], quorum: Quorum, outcome: Outcome
) -> None:
    prober = HttpProber([u.url for u in three], ProbeSpec(timeout=2.0), quorum=quorum)
    try:
        result = await prober.probe()
        assert result.outcome is outcome
        if outcome is not Outcome.OK:
            assert result.error is not None and "2/3 passed (quorum all)" in result.error
        again = await prober.probe()  # a second round, on fresh connections, still works
        assert again.outcome is outcome
    finally:
        await prober.aclose()
    assert all(u.requests == 2 for u in three)


async def test_majority_fails_when_most_fail(three: list[Upstream]) -> None:
    three[1].set_mode("http_503")
    prober = HttpProber([u.url for u in three], ProbeSpec(timeout=2.0), quorum="majority")
    try:
        result = await prober.probe()
    finally:
        await prober.aclose()
    assert result.outcome is Outcome.HTTP_5XX
    assert result.status == 503
