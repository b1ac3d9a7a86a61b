"""Does a hung webhook receiver delay a rollback? Interleaved trials, with and without one.

    uv run --frozen python -m bench.hung_receiver [--trials 8]

Each trial starts a lab (two upstreams, a private nginx, `guardd run` at 200 ms x 3),
makes green answer 503, and times the fault until nginx serves only blue for 0.5 s on
fresh connections. Every other trial adds a webhook sink whose receiver accepts and never
answers.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.harness.daemon import Lab

_SINK = (
    '\n[[notify]]\nkind = "webhook"\nurl_env = "HOOK"\n'
    'events = ["started", "alert", "rollback_started", "rollback", "qos"]\n'
)


def _hung_receiver() -> tuple[socket.socket, list[socket.socket]]:
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, held


def _trial(hook_port: int | None) -> float:
    lab = Lab(Path(tempfile.mkdtemp(prefix="guardd-bench-")), qos__window="1h")
    try:
        if hook_port is not None:
            lab.config_path.write_text(lab.config_text() + _SINK)
        env = {"HOOK": f"http://127.0.0.1:{hook_port}/hook"} if hook_port else None
        daemon = lab.daemon(env=env)
        time.sleep(1.0)  # a steady second before the fault: pacing, not waiting on an event
        fault = time.monotonic()
        lab.green.set_mode("http_503")
        streak: float | None = None
        while True:
            now = time.monotonic()
            if lab.nginx.served_color() == "blue":
                streak = streak or now
                if now - streak >= 0.5:
                    break
            else:
                streak = None
            time.sleep(0.005)
        daemon.stop()
        return streak - fault
    finally:
        lab.close()


def main() -> None:
    """Run the interleaved trials and print both distributions."""
    parser = argparse.ArgumentParser(prog="python -m bench.hung_receiver")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    server, held = _hung_receiver()
    port = server.getsockname()[1]
    plain, hung = [], []
    for _ in range(args.trials):
        plain.append(_trial(None))
        hung.append(_trial(port))
    server.close()
    print(f"connections the hung receiver held: {len(held)}")
    for name, runs in (("no receiver", plain), ("hung receiver", hung)):
        print(
            f"{name}: median {statistics.median(runs):.3f} s, max {max(runs):.3f} s  "
            + " ".join(f"{r:.3f}" for r in runs)
        )


if __name__ == "__main__":
    main()
