"""Attribution of nginx's `$upstream_addr` to a color: where each color's addresses come from."""

from __future__ import annotations

from pathlib import Path

from guardd.upstream_addresses import color_addresses, resolve, server_lines, url_address


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
