"""Attribution of nginx's `$upstream_addr` to a color: where each color's addresses come from."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from guardd.core.types import Color
from guardd.upstream_addresses import (
    color_addresses,
    crossed_targets,
    resolve,
    server_lines,
    url_address,
)


def test_server_lines_of_an_upstream_file() -> None:
    text = """
    upstream threader_app {
        server 127.0.0.1:9009 max_fails=0;   # the blue build
        # server 127.0.0.1:7777;
        server [::1]:9009;server unix:/run/app.sock;
    }
    """
    assert server_lines(text) == ["127.0.0.1:9009", "[::1]:9009", "unix:/run/app.sock"]


def test_url_address_uses_the_scheme_s_port() -> None:
    assert url_address("http://127.0.0.1:9009/healthz") == "127.0.0.1:9009"
    assert url_address("https://10.0.0.5/healthz") == "10.0.0.5:443"
    assert url_address("http://[::1]/x") == "[::1]:80"
    assert url_address("http:///nohost") is None


def test_names_resolve_as_nginx_would_log_them() -> None:
    assert "127.0.0.1:9009" in resolve("localhost:9009")
    assert resolve("10.0.0.5") == ["10.0.0.5:80"]
    assert resolve("no-such-host.invalid:80") == []


def test_targets_then_probe_urls_and_shared_addresses_are_dropped(tmp_path: Path) -> None:
    blue = tmp_path / "blue.conf"
    blue.write_text("upstream a { server 127.0.0.1:9009; server 127.0.0.1:9999; }\n")
    green = tmp_path / "green.conf"
    green.write_text("upstream a { server 127.0.0.1:9999; }\n")
    got, problems = color_addresses(
        given=None,
        targets={"blue": blue, "green": green},
        probe_urls={"blue": ["http://127.0.0.1:1/"], "green": ["http://127.0.0.1:2/"]},
    )
    # 9999 is in both files: never guessed.
    assert got == {"blue": frozenset({"127.0.0.1:9009"}), "green": frozenset()}
    assert any("127.0.0.1:9999" in p for p in problems)


def test_given_addresses_win_and_probe_urls_are_the_last_resort(tmp_path: Path) -> None:
    got, problems = color_addresses(
        given={"green": ["127.0.0.1:9010"]},
        targets={"blue": tmp_path / "missing.conf"},
        probe_urls={"blue": ["http://127.0.0.1:9009/healthz"], "green": ["http://x.invalid/"]},
    )
    assert got == {"blue": frozenset({"127.0.0.1:9009"}), "green": frozenset({"127.0.0.1:9010"})}
    assert problems and "missing.conf" in problems[0]


PROBES: dict[Color, list[str]] = {
    "blue": ["http://127.0.0.1:9009/healthz"],
    "green": ["http://localhost:9010/healthz"],
}


def _files(tmp_path: Path, blue: str, green: str) -> dict[Color, Path]:
    paths: dict[Color, Path] = {"blue": tmp_path / "b.conf", "green": tmp_path / "g.conf"}
    paths["blue"].write_text(blue)
    paths["green"].write_text(green)
    return paths


def test_files_that_proxy_to_their_own_color_are_not_crossed(tmp_path: Path) -> None:
    files = _files(
        tmp_path,
        "upstream a { server 127.0.0.1:9009; server 127.0.0.1:7000 backup; }",
        "upstream a { server localhost:9010; }",  # a name, resolved as nginx would
    )
    assert crossed_targets(files, PROBES) == {}


def test_swapped_files_are_each_crossed(tmp_path: Path) -> None:
    files = _files(
        tmp_path, "upstream a { server 127.0.0.1:9010; }", "upstream a { server 127.0.0.1:9009; }"
    )
    got = crossed_targets(files, PROBES)
    assert set(got) == {"blue", "green"}
    assert got["blue"] == (
        f"{files['blue']} proxies to 127.0.0.1:9010, where upstreams.green is probed, and to "
        "no address of upstreams.blue: a switch to blue would serve green"
    )
    assert "a switch to green would serve blue" in got["green"]


def test_a_copy_of_the_other_colors_file_is_crossed(tmp_path: Path) -> None:
    blue = "upstream a { server 127.0.0.1:9009; }"
    got = crossed_targets(_files(tmp_path, blue, blue), PROBES)
    assert list(got) == ["green"]
    assert "proxies to 127.0.0.1:9009, where upstreams.blue is probed" in got["green"]


def test_a_file_reaching_both_colors_names_its_own_and_is_not_crossed(tmp_path: Path) -> None:
    both = "upstream a { server 127.0.0.1:9009; server 127.0.0.1:9010; }"
    assert crossed_targets(_files(tmp_path, both, both), PROBES) == {}


def test_what_proves_nothing_is_not_judged(tmp_path: Path) -> None:
    # Probes on a health port beside the traffic port: no server is a probed address.
    health: dict[Color, list[str]] = {
        "blue": ["http://127.0.0.1:8009/h"],
        "green": ["http://127.0.0.1:8010/h"],
    }
    swapped = _files(
        tmp_path, "upstream a { server 127.0.0.1:9010; }", "upstream a { server 127.0.0.1:9009; }"
    )
    assert crossed_targets(swapped, health) == {}
    # Both colors probed at one address (paths apart): that address tells no color.
    one: dict[Color, list[str]] = {
        "blue": ["http://127.0.0.1:9009/blue"],
        "green": ["http://127.0.0.1:9009/green"],
    }
    assert crossed_targets(swapped, one) == {}
    # No server line, a name that does not resolve, a file that cannot be read.
    odd = _files(tmp_path, "# nothing here\n", "upstream a { server no-such-host.invalid:9009; }")
    assert crossed_targets(odd, PROBES) == {}
    assert crossed_targets({"blue": tmp_path / "missing.conf"}, PROBES) == {}


def test_a_fifo_for_an_upstream_file_is_refused_never_waited_on(tmp_path: Path) -> None:
    # A read of a FIFO waits for a writer for ever: at a reload, the whole guard with it.
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    good = tmp_path / "g.conf"
    good.write_text("upstream a { server 127.0.0.1:9010; }")
    targets: dict[Color, Path] = {"blue": fifo, "green": good}
    pool = ThreadPoolExecutor(2)
    crossed = pool.submit(crossed_targets, targets, PROBES)
    found = pool.submit(color_addresses, given=None, targets=targets, probe_urls=PROBES)
    both: list[Future[Any]] = [crossed, found]
    try:
        finished, _ = wait(both, timeout=30)
    finally:
        # Should a read wait on it after all, writers end it: the test fails, never hangs.
        while wait(both, timeout=0.05).not_done:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pool.shutdown()
    assert finished == {crossed, found}, "a read waited on the FIFO"
    assert crossed.result() == {}
    addresses, problems = found.result()
    assert problems == [f"cannot read {fifo}: not a regular file (a FIFO)"]
    # Blue's addresses come from its probe URL instead.
    assert addresses == {
        "blue": frozenset({"127.0.0.1:9009"}),
        "green": frozenset({"127.0.0.1:9010"}),
    }
