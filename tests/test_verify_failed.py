"""A switch the front door does not confirm fails with what the front door answered.

A real `Guard` (real journal and state; fake clock, switcher and front door): the
`VerifyFailed` it meets carries the answers counted and the last one's HTTP status and
error text, and the operator's switch is refused (`OperationRefused`) with that text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.core.types import Outcome
from guardd.exceptions import OperationRefused, VerifyFailed
from guardd.operator import handle
from guardd.probes.http import ProbeResult
from tests.harness.guard_fakes import OK, SPEC, FakeClock, FakeVerifier, prepare, start, steps

pytestmark = pytest.mark.anyio
ROOT = "uid:0(root)"


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (ProbeResult(Outcome.HTTP_5XX, 0.001, "HTTP 503", 503), 503, "HTTP 503"),
        (ProbeResult(Outcome.HTTP_OTHER, 0.001, "HTTP 404", 404), 404, "HTTP 404"),
        (
            ProbeResult(Outcome.CONNECT_ERROR, 0.001, "connection refused"),
            None,
            "connection refused",
        ),
        (ProbeResult(Outcome.TIMEOUT, 0.001), None, "timeout"),
    ],
    ids=["503", "404", "refused", "timeout without text"],
)
async def test_verify_failed_carries_the_front_doors_answer(
    tmp_path: Path, answer: ProbeResult, status: int | None, error: str
) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    front = FakeVerifier()
    g = await start(tmp_path, clock, SPEC, front)
    await steps(g, clock, [(OK, OK, OK)] * 2)
    front.result = answer
    outcome = await g.switch_verified("green", "blue", switch=True)
    failure = outcome.failure
    assert isinstance(failure, VerifyFailed) and outcome.step == "verify"
    assert failure.status == status
    assert failure.error == error
    assert failure.answers >= 1 and failure.passed == 0
    assert str(failure).startswith(f"verify failed: 0/{failure.answers} answers passed")
    assert str(failure).endswith(f"last: {error}")
    assert g.active == "green"  # undone


async def test_an_unconfirmed_switch_is_refused_with_the_answer(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    front = FakeVerifier()
    g = await start(tmp_path, clock, SPEC, front)
    await steps(g, clock, [(OK, OK, OK)] * 2)
    front.result = ProbeResult(Outcome.HTTP_5XX, 0.001, "HTTP 502", 502)
    with pytest.raises(OperationRefused, match=r"switch to blue failed at verify.*last: HTTP 502"):
        await handle(g, "switch", {"color": "blue", "force": True}, ROOT)
    assert g.active == "green"
    alert = g.journal.recent[-1]
    assert alert["event"] == "alert" and alert["step"] == "verify"
