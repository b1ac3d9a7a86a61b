"""A config reload storm: 100 SIGHUPs in 5 s, half of them onto a broken file.

No crash, no lost window state (the sample counts keep growing through the storm),
and the config in force at the end is the last valid one.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.faults.util import FaultLab, MakeFaultLab, figure, status
from tests.harness.daemon import wait_until

pytestmark = pytest.mark.nginx

SIGNALS = 100
SECONDS = 5.0
BROKEN = [
    "this is not TOML [[[\n",
    "[policy]\nconsecutive_failures = 0\n",
    '[probe]\nfast_interval = "5s"\ninterval = "1s"\n',
    '[upstreams.blue]\nurl = "ftp://nowhere"\n',
    "[nonsense]\nkey = 1\n",
]


def test_100_sighups_in_5s_half_broken(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(probe__interval="200ms", policy__window="10m")
    d = lab.daemon()
    wait_until(lambda: status(lab)["upstreams"]["green"]["samples"] >= 5, 20, "a few samples")

    # Watch the windows through the storm from another thread, over the control socket.
    seen: list[dict[str, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            doc = status(lab)
            seen.append({c: doc["upstreams"][c]["samples"] for c in ("blue", "green")})
            done.wait(0.1)

    watcher = threading.Thread(target=watch, name="storm-watcher")
    watcher.start()
    count = len(d.events())
    valid_intervals: list[str] = []
    started = time.monotonic()
    try:
        for i in range(SIGNALS):
            if i % 2:
                interval = f"{200 + 10 * (i % 7)}ms"
                lab.write_config(probe__interval=interval)
                valid_intervals.append(interval)
            else:
                lab.config_path.write_text(BROKEN[(i // 2) % len(BROKEN)])
            d.signal(signal.SIGHUP)
            # Pace the storm at 100 signals in 5 s.
            time.sleep(max(0.0, started + SECONDS * (i + 1) / SIGNALS - time.monotonic()))
        storm = time.monotonic() - started
        # The file now holds the last valid config; wait for the daemon to run it.
        last = float(valid_intervals[-1].removesuffix("ms")) / 1000
        wait_until(lambda: status(lab)["probe_interval_s"] == last, 20, "the last valid config")
    finally:
        done.set()
        watcher.join()

    assert d.proc is not None and d.proc.poll() is None, "the storm killed guardd"
    events = d.events()[count:]
    reloaded = [e for e in events if e["event"] == "config_reloaded"]
    rejected = [e for e in events if e["event"] == "alert" and "reload rejected" in e["reason"]]
    assert reloaded and rejected, "both kinds of reload were seen"
    assert all(e["kept_history"] == ["blue", "green"] for e in reloaded)
    # Signals may coalesce, never multiply.
    assert len(reloaded) + len(rejected) <= SIGNALS
    # No window was reset: the samples only ever grew.
    for color in ("blue", "green"):
        counts = [s[color] for s in seen]
        assert counts == sorted(counts), f"{color}'s window lost samples: {counts}"
        assert counts[-1] > counts[0] + 10
    figure(
        "reload_storm",
        signals=SIGNALS,
        seconds=round(storm, 2),
        applied=len(reloaded),
        rejected=len(rejected),
        samples_before=seen[0],
        samples_after=seen[-1],
    )
    # Still guarding, on the last valid config.
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed", after=count)
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
    assert d.stop() == 0
