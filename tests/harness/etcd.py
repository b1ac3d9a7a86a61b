"""A real etcd cluster on loopback (Debian's `etcd-server`), and a TCP proxy to cut a node off.

    with EtcdCluster(tmp_path) as etcd:     # 3 members, healthy
        etcd.client_urls                    # ["http://127.0.0.1:<port>", ...]
        etcd.kill(0)                        # kill -9 one member
        etcd.range("/guardd/lab/", prefix=True)
        etcd.wipe()                         # every member's data gone: an empty store, same ports
    # leaving the `with` stops every member and deletes its data dir (the logs stay)

    with TcpProxy(etcd.client_urls[0]) as proxy:   # proxy.url forwards to that member
        proxy.stop()                        # drop every connection, refuse new ones
        proxy.start()                       # and back, on the same port

If no `etcd` binary is found the harness installs Debian's `etcd-server` (root only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness.daemon import wait_until
from tests.harness.nginx import free_port
from tests.harness.paths import debian_binary


def etcd_binary() -> str:
    """The etcd binary, installing Debian's etcd-server if missing."""
    return debian_binary("etcd", "etcd-server")


class EtcdCluster:
    """`size` etcd members on free loopback ports, each with its own data dir and log."""

    def __init__(self, tmp: Path, size: int = 3) -> None:
        self.tmp = tmp
        self.size = size
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.binary = etcd_binary()
        self.generation = 0  # how many times the cluster was wiped (and so named anew)

    @property
    def client_urls(self) -> list[str]:
        """Each member's client URL."""
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def _argv(self, i: int) -> list[str]:
        cluster = ",".join(f"e{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        return [
            self.binary,
            f"--name=e{i}",
            f"--data-dir={self.tmp / f'e{i}'}",
            f"--listen-client-urls={self.client_urls[i]}",
            f"--advertise-client-urls={self.client_urls[i]}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_ports[i]}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_ports[i]}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=guardd-test-{self.peer_ports[0]}-{self.generation}",
        ]

    def start_member(self, i: int) -> None:
        """Start member `i` (again, with its data dir)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        log = (self.tmp / f"e{i}.log").open("ab")
        self.procs[i] = subprocess.Popen(self._argv(i), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start(self, attempts: int = 3) -> EtcdCluster:
        """Start every member; return once each says it is healthy.

        A port from `free_port` was free a moment ago, but the kernel may hand it to any
        outgoing connection before etcd binds it; a member that exits while the cluster forms
        is such a race, so the whole cluster starts again on fresh ports and fresh data dirs.
        """
        for attempt in range(1, attempts + 1):
            for i in range(self.size):
                self.start_member(i)
            try:
                formed = wait_until(self._formed_or_dead, 60, "etcd members healthy", poll=0.1)
                if formed == "formed":
                    return self
            except AssertionError:
                pass  # stuck rather than dead: start over all the same, and report the logs
            self.close()
            if attempt == attempts:
                break
            self.client_ports = [free_port() for _ in range(self.size)]
            self.peer_ports = [free_port() for _ in range(self.size)]
        logs = {i: self._log_tail(i) for i in range(self.size)}
        raise AssertionError(f"etcd did not form after {attempts} attempts: {logs}")

    def wipe(self, *, new_cluster: bool = False) -> None:
        """Stop every member, delete its data and start them again on the same ports: the
        store starts over at revision 1, as after a restore from an empty backup.

        `new_cluster` names the cluster anew (another initial-cluster-token), so that etcd's
        cluster_id changes too, as when the cluster is replaced by a new one.
        """
        self.close()
        if new_cluster:
            self.generation += 1
        for i in range(self.size):
            self.start_member(i)
        formed = wait_until(self._formed_or_dead, 60, "wiped etcd members healthy", poll=0.1)
        if formed != "formed":
            logs = {i: self._log_tail(i) for i in range(self.size)}
            raise AssertionError(f"the wiped etcd did not form again: {logs}")

    def backup(self, dest: Path) -> None:
        """A cold backup: stop every member, copy its data dir into `dest`, start them again
        (the same cluster, the same ports)."""
        self.stop()
        for i in range(self.size):
            shutil.copytree(self.tmp / f"e{i}", dest / f"e{i}")
        self._restart("etcd members healthy after the backup")

    def restore(self, src: Path, *, outage: float = 0.0) -> None:
        """Stop every member, put the data dirs of a `backup` back, wait `outage` seconds
        (etcd down meanwhile, as during a real restore) and start them again: the store is
        as it was at the backup, its cluster_id the same."""
        self.close()
        for i in range(self.size):
            shutil.copytree(src / f"e{i}", self.tmp / f"e{i}")
        time.sleep(outage)  # the outage itself is the condition under test, not a wait
        self._restart("restored etcd members healthy")

    def _restart(self, what: str) -> None:
        for i in range(self.size):
            self.start_member(i)
        if wait_until(self._formed_or_dead, 60, what, poll=0.1) != "formed":
            logs = {i: self._log_tail(i) for i in range(self.size)}
            raise AssertionError(f"{what}: no: {logs}")

    def revision(self) -> int:
        """The store's revision now."""
        doc = self._post("kv/range", {"key": base64.b64encode(b"/").decode()})
        return int(doc["header"]["revision"])

    def cluster_id(self) -> str:
        """etcd's cluster_id, as its answers' headers give it."""
        doc = self._post("kv/range", {"key": base64.b64encode(b"/").decode()})
        return str(doc["header"]["cluster_id"])

    def _formed_or_dead(self) -> str | None:
        """`formed` once every member is healthy, `dead` if one exited, else None."""
        if any(p is not None and p.poll() is not None for p in self.procs):
            return "dead"
        if all(self.healthy(i) for i in range(self.size)):
            return "formed"
        return None

    def _log_tail(self, i: int, lines: int = 5) -> list[str]:
        try:
            text = (self.tmp / f"e{i}.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def healthy(self, i: int) -> bool:
        """Whether member `i` answers /health with true."""
        try:
            with urllib.request.urlopen(f"{self.client_urls[i]}/health", timeout=2) as r:  # noqa: S310
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def kill(self, i: int) -> None:
        """kill -9 member `i`."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def freeze(self, i: int) -> None:
        """SIGSTOP member `i`: its connections stay open and say nothing more."""
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, f"member {i} is not running"
        proc.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        """SIGCONT member `i` (frozen by `freeze`)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def _status(self, i: int) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.client_urls[i]}/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as r:  # noqa: S310
            doc = json.loads(r.read())
        assert isinstance(doc, dict), doc
        return doc

    def leader(self) -> int:
        """The index of the member that leads the raft group now."""
        ids = [self._status(i)["header"]["member_id"] for i in range(self.size)]
        return ids.index(self._status(0)["leader"])

    def lead_from(self, i: int) -> None:
        """Make member `i` the raft leader (`etcdctl move-leader`), and wait until it is."""
        target = self._status(i)["header"]["member_id"]
        wait_until(lambda: self._move_leader(target, i), 60, f"member {i} leading", poll=0.2)

    def _move_leader(self, target: str, i: int) -> bool:
        leader = self.leader()
        if leader != i:
            with contextlib.suppress(OSError):  # refused while an election runs: try again
                request = urllib.request.Request(  # noqa: S310 - loopback
                    f"{self.client_urls[leader]}/v3/maintenance/transfer-leadership",
                    data=json.dumps({"targetID": target}).encode(),
                    method="POST",
                )
                urllib.request.urlopen(request, timeout=5).close()  # noqa: S310
        return self.leader() == i

    def range(self, key: str, *, prefix: bool = False) -> dict[str, Any]:
        """The keys (decoded, values parsed as JSON when they are) from any live member."""
        body: dict[str, str] = {"key": base64.b64encode(key.encode()).decode()}
        if prefix:
            end = key.encode()[:-1] + bytes([key.encode()[-1] + 1])
            body["range_end"] = base64.b64encode(end).decode()
        for url in self.client_urls:
            request = urllib.request.Request(  # noqa: S310 - loopback
                f"{url}/v3/kv/range", data=json.dumps(body).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as r:  # noqa: S310
                    doc = json.loads(r.read())
            except (OSError, ValueError):
                continue
            out: dict[str, Any] = {}
            for kv in doc.get("kvs", []):
                value = base64.b64decode(kv.get("value", "")).decode()
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
                out[base64.b64decode(kv["key"]).decode()] = value
            return out
        raise AssertionError("no etcd member answered")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for url in self.client_urls:
            request = urllib.request.Request(  # noqa: S310 - loopback
                f"{url}/v3/{path}", data=json.dumps(body).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as r:  # noqa: S310
                    doc = json.loads(r.read())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict):
                return doc
        raise AssertionError("no etcd member answered")

    def lease_of(self, key: str) -> int | None:
        """The lease `key` is held under (0: none), or None when there is no such key."""
        body = {"key": base64.b64encode(key.encode()).decode()}
        kvs = self._post("kv/range", body).get("kvs", [])
        return int(kvs[0].get("lease", 0)) if kvs else None

    def put(self, key: str, value: str) -> int:
        """Write `key` on any live member; the store's revision after it."""
        body = {"key": base64.b64encode(key.encode()).decode()}
        body["value"] = base64.b64encode(value.encode()).decode()
        return int(self._post("kv/put", body)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete `key` (every key under it with `prefix`), as `etcdctl del [--prefix]`
        does; how many keys were deleted."""
        body = {"key": base64.b64encode(key.encode()).decode()}
        if prefix:
            end = key[:-1] + chr(ord(key[-1]) + 1)
            body["range_end"] = base64.b64encode(end.encode()).decode()
        return int(self._post("kv/deleterange", body).get("deleted", 0))

    def compact(self) -> int:
        """Compact the store at its current revision (a watch from before must start over)."""
        revision = self.revision()
        self._post("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def metric(self, name: str, **labels: str) -> float:
        """The sum over the live members of the series `name` whose labels include `labels`."""
        total = 0.0
        want = [f'{k}="{v}"' for k, v in labels.items()]
        for url in self.client_urls:
            try:
                with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:  # noqa: S310
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                series, _, value = line.rpartition(" ")
                if series.split("{", 1)[0] == name and all(w in series for w in want):
                    total += float(value)
        return total

    def calls(self, method: str) -> int:
        """gRPC calls of `method` (`Range`, `Put`, `Watch`, ...) the members started, so far:
        what the JSON gateway forwarded."""
        return int(self.metric("grpc_server_started_total", grpc_method=method))

    def stop(self) -> None:
        """Stop every member."""
        for i in range(self.size):
            self.kill(i)

    def close(self) -> None:
        """Stop every member and delete its data dir; the logs stay.

        Each member preallocates 64 MB WAL files (etcd's segment size, no flag changes it),
        so a suite of fleet tests would otherwise leave gigabytes behind, failed or not.
        """
        self.stop()
        for i in range(self.size):
            shutil.rmtree(self.tmp / f"e{i}", ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TcpProxy:
    """A TCP forwarder on a free loopback port to one `host:port`, that a test can cut."""

    def __init__(self, upstream_url: str) -> None:
        host, _, port = upstream_url.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The URL a client uses instead of the upstream's."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Listen (again) and forward every connection."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(None)
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def stop(self) -> None:
        """Refuse new connections and drop every open one."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
