"""Two machines on one: a head and a worker node in two network namespaces joined by a veth pair.

The head namespace runs `up demo --role head` (a real etcd + the real Dynamo frontend); the worker
namespace runs `up demo --role worker --head <head>` (real mocker decode + prefill). Requests go to
the head's frontend from inside the head namespace. Killing the worker node's supervisor (SIGKILL:
its guardian takes the workers with it, nothing deregisters) must make the head drop the model once
the etcd leases expire; starting the worker node again must make the model ready again.

The cluster transport is authenticated: the head generates the cluster credentials, the test hands
them to the worker node as the README says (a copy into its state directory, 0600), and an
anonymous etcd or NATS client from the worker namespace is refused. With TCP/ZMQ planes the profile
acknowledges them as open (discovery.insecure_planes) and each node runs the README's firewall rule
(read from README.md: nftables on the head, iptables on the worker node, each allowing only the
other node): the deployment works under it, and from a second address on the link every listener
beyond loopback times out but the head's API. With NATS planes and Dynamo's mutual TLS on the
frontend's response stream nothing is left open, no acknowledgement is needed, and a TLS client
without the cluster certificate is refused there ("certificate required").

Needs root, iproute2, openssl, nftables and iptables (CI runs as root; `make system-deps` installs them). Where namespaces
cannot be made, the test is skipped with the reason; it never passes silently without running.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import CLI, MARKER, SESSION, reap_marked, wait_for
from netfilter import probe, readme_rule

pytestmark = pytest.mark.e2e
HEAD_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"
# A second address on each namespace's link that the other node's firewall does not allow: a
# stranger on the same network (a /32, so each node's own route keeps its first address).
STRANGER_AT_WORKER, STRANGER_AT_HEAD = "10.213.0.3", "10.213.0.4"
BASE = 21000  # fresh namespaces: every port is free there
LEASE_TTL_S = 3  # how long a SIGKILLed worker's registration outlives it (discovery.lease_ttl_s)
COMMON = (
    "demo",
    "--set",
    "discovery.backend=etcd",
    "--set",
    f"ports.base={BASE}",
    "--set",
    f"discovery.lease_ttl_s={LEASE_TTL_S}",
    "--set",
    "workers.decode.stop_timeout_s=3",
    "--set",
    "workers.prefill.stop_timeout_s=3",
)
READY_URL = f"http://127.0.0.1:{BASE}/v1/models/demo/ready"
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NetnsClient:
    """HTTP and TCP from inside a network namespace: threads that entered it with setns(2).

    A network namespace switch applies to the calling thread only, so the test process itself
    stays where it is; every request runs on one of those threads."""

    def __init__(self, netns: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=8, initializer=self._enter, initargs=(netns,))

    @staticmethod
    def _enter(netns: str) -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
        finally:
            os.close(fd)

    def post(self, url: str, body: dict, timeout: float = 5.0) -> tuple[int, str]:
        return self._pool.submit(self._request, "POST", url, body, timeout).result()

    @staticmethod
    def _request(method: str, url: str, body: dict | None, timeout: float) -> tuple[int, str]:
        try:
            with httpx.Client(trust_env=False, timeout=timeout) as client:
                response = client.request(method, url, json=body)
                return response.status_code, response.text
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    def get(self, url: str, timeout: float = 2.0) -> tuple[int, str]:
        return self._pool.submit(self._request, "GET", url, None, timeout).result()

    def chat(self) -> tuple[int, str]:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
        return self._pool.submit(
            self._request, "POST", f"http://127.0.0.1:{BASE}/v1/chat/completions", body, 30.0
        ).result()

    def nats_hello(self, host: str, port: int) -> str:
        """What a NATS server answers a client that connects with no credentials and pings."""

        def hello() -> str:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.settimeout(5)
                conn.recv(4096)  # INFO
                conn.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
                return conn.recv(4096).decode(errors="replace")

        return self._pool.submit(hello).result()

    def tls_client(self, host: str, port: int, pki: Path, *, certificate: bool) -> str:
        """What a TLS client that trusts the cluster CA gets, with or without the node certificate:
        "held open" (the server waits for a request) or "refused: ..." (closed on us)."""

        def attempt() -> str:
            context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            if certificate:
                context.load_cert_chain(pki / "node.pem", pki / "node.key")
            try:
                with socket.create_connection((host, port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname=TLS_NAME) as conn:
                        # TLS 1.3: the server judges the client's certificate after the handshake.
                        conn.settimeout(1.0)
                        data = conn.recv(64)
                        return f"refused: closed ({data!r})"
            except TimeoutError:
                return "held open"
            except (ssl.SSLError, OSError) as exc:
                return f"refused: {exc}"

        return self._pool.submit(attempt).result()

    def connect(self, host: str, ports: list[int], *, source: str, timeout: float = 1.0) -> dict[int, str]:
        """Per port, a TCP connection from ``source``: "connected", "refused" or "timed out"
        (netfilter.probe), all at once (the pool's threads are all in the namespace)."""
        tries = {port: self._pool.submit(probe, host, port, source=source, timeout=timeout) for port in ports}
        return {port: attempt.result() for port, attempt in tries.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class Pair:
    head: str
    worker: str
    head_dev: str
    worker_dev: str


@pytest.fixture
def netns_pair() -> Iterator[Pair]:
    """Two namespaces, loopback up in each, joined by a veth pair with HEAD_IP and WORKER_IP."""
    if os.geteuid() != 0:
        pytest.skip("two-host test: creating network namespaces needs root (CI runs the suite as root)")
    if shutil.which("ip") is None:
        pytest.skip("two-host test: iproute2's `ip` is missing (`make system-deps` installs it)")
    tag = uuid.uuid4().hex[:6]
    pair = Pair(
        head=f"lmcs-head-{tag}", worker=f"lmcs-worker-{tag}", head_dev=f"lmh{tag}", worker_dev=f"lmw{tag}"
    )
    made: list[str] = []
    try:
        for name in (pair.head, pair.worker):
            try:
                ip("netns", "add", name)
            except RuntimeError as exc:
                if not made:
                    pytest.skip(f"two-host test: this host cannot make network namespaces ({exc})")
                raise
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", f"lmh{tag}", "type", "veth", "peer", "name", f"lmw{tag}")
        for dev, name, addr in ((f"lmh{tag}", pair.head, HEAD_IP), (f"lmw{tag}", pair.worker, WORKER_IP)):
            ip("link", "set", dev, "netns", name)
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
        yield pair
    finally:
        subprocess.run(
            ["ip", "link", "del", f"lmh{tag}"], check=False, capture_output=True
        )  # if it never moved
        for name in made:
            pids = subprocess.run(
                ["ip", "netns", "pids", name], check=False, capture_output=True, text=True
            ).stdout.split()
            for pid in pids:  # only our own processes can live in a namespace this test made
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            ip("netns", "del", name)


@dataclass
class Node:
    """One `up` in a namespace, with its own state root and leak marker, as on its own machine."""

    netns: str
    args: tuple[str, ...]
    tmp: Path
    marker: str = ""
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    def env(self) -> dict[str, str]:
        env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(self.tmp / "state"), MARKER: self.marker}
        env.pop("LMCACHE_SUPERVISE_DEBUG", None)
        return env

    def start(self) -> None:
        self.runs += 1
        self.marker = f"{SESSION}-2h-{uuid.uuid4().hex[:8]}"
        self.out, self.err = self.tmp / f"up{self.runs}.out", self.tmp / f"up{self.runs}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            # `ip netns exec` execs the command in place: this pid is the supervisor itself.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, CLI, "up", "--quiet-children", *self.args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def said(self, text: str) -> bool:
        if not self.alive():
            pytest.fail(
                f"{self.netns} supervisor exited {self.proc.returncode if self.proc else '?'}: "
                f"{self.err.read_text(errors='replace')[-3000:]}"
            )
        return text in self.out.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.err.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                found.append(json.loads(line))
        return [e for e in found if e.get("event") == name]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leaked = reap_marked(self.marker)
        assert not leaked, f"{self.netns}: processes left behind: {leaked}"


def hand_over_credentials(head: Node, worker: Node) -> dict[str, str]:
    """The documented step: copy the head's cluster-credentials into the worker node's state
    directory, 0600. Returns the secret values (to prove they are never shown)."""
    source = head.tmp / "state" / "demo" / "cluster-credentials"
    assert oct(source.stat().st_mode & 0o777) == "0o600"
    assert oct(source.parent.stat().st_mode & 0o777) == "0o700"
    target = worker.tmp / "state" / "demo"
    target.mkdir(parents=True, mode=0o700, exist_ok=True)
    shutil.copyfile(source, target / "cluster-credentials")
    (target / "cluster-credentials").chmod(0o600)
    values = dict(line.split("=", 1) for line in source.read_text().splitlines())
    return {k: v for k, v in values.items() if k != "ETCD_AUTH_USERNAME"}


def assert_never_shown(secrets: dict[str, str], *nodes: Node) -> None:
    """No secret in what `up` printed, in the state directories' logs, or on any command line."""
    texts = []
    for node in nodes:
        texts += [p.read_text(errors="replace") for p in node.tmp.glob("up*.*")]
        texts += [p.read_text(errors="replace") for p in (node.tmp / "state").rglob("*.log")]
    cmdlines = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdlines.append(" ".join(proc.info["cmdline"] or ()))
    for name, value in secrets.items():
        assert not any(value in text for text in texts), f"{name} shown in output or logs"
        assert not any(value in line for line in cmdlines), f"{name} on a command line"


NATS_PLANES = ("--set", "discovery.request_plane=nats", "--set", "discovery.event_plane=nats")
# The TCP and ZMQ planes cross the veth without authentication: acknowledged (without it plan, check
# and up refuse: tests/plan/test_exposure.py), and firewalled on the head with the README's rule, which
# opens the API to anyone: the frontend listens beyond loopback so that a stranger can reach it.
OPEN_PLANES = ("--set", "discovery.insecure_planes=true", "--set", "frontend.host=0.0.0.0")
TLS_NAME = "lmcs-cluster"  # the certificate's only name: every node checks it via DYN_TCP_TLS_SERVER_NAME


def load_readme_firewall(netns: str, tool: str, node: str) -> None:
    """The README's rule for ``tool`` ("nft" or "iptables") in ``netns``, with ``node`` as the only
    other node and the frontend's port as the API. The rules live and die with the namespace."""
    if shutil.which(tool) is None:
        pytest.skip(f"two-host test: `{tool}` is missing (`make system-deps` installs it)")
    for command in readme_rule(tool, f"{node}/32", BASE):
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *command], check=False, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr.strip()}"


def listening_beyond_loopback(netns: str, proto: str) -> dict[int, str]:
    """The ports on which something listens in ``netns`` on an address other than loopback
    (``proto``: "t" for TCP, "u" for UDP), each with its line from ss."""
    table = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", f"-H{proto}lnp"], check=True, capture_output=True, text=True
    ).stdout
    found = {}
    for line in table.splitlines():
        address, port = line.split()[3].rsplit(":", 1)
        if address not in ("127.0.0.1", "[::1]") and not address.startswith("127."):
            found[int(port)] = line
    return found


def make_pki(folder: Path) -> tuple[str, ...]:
    """A CA and one certificate for every node (server and client use), made with openssl; the
    profile flags that give Dynamo's TCP planes mutual TLS with them."""
    if shutil.which("openssl") is None:
        pytest.skip("two-host test: openssl is missing (`make system-deps` installs it)")
    folder.mkdir(mode=0o700)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=lmcs-ca")
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", f"/CN={TLS_NAME}")
    (folder / "ext.cnf").write_text(
        f"subjectAltName=DNS:{TLS_NAME}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf",
    )  # fmt: skip
    env = {
        "DYN_TCP_TLS_CERT_PATH": "node.pem",
        "DYN_TCP_TLS_KEY_PATH": "node.key",
        "DYN_TCP_TLS_CLIENT_CA_CERT_PATH": "ca.pem",  # the server then requires a client certificate
        "DYN_TCP_TLS_CA_CERT_PATH": "ca.pem",
        "DYN_TCP_TLS_CLIENT_CERT_PATH": "node.pem",
        "DYN_TCP_TLS_CLIENT_KEY_PATH": "node.key",
    }
    flags = [f'env.{k}="{folder / v}"' for k, v in env.items()] + [
        f'env.DYN_TCP_TLS_SERVER_NAME="{TLS_NAME}"'
    ]
    return tuple(arg for flag in flags for arg in ("--set", flag))


@pytest.mark.parametrize("variant", ["tcp-zmq-planes", "nats-planes-mtls"])
def test_worker_node_joins_leaves_and_rejoins_the_head(
    netns_pair: Pair, tmp_path: Path, variant: str
) -> None:
    """TCP/ZMQ planes, acknowledged as open; or NATS planes (the token) with Dynamo's mutual TLS on
    the frontend's response stream: nothing left open, so no acknowledgement needed."""
    started = time.monotonic()
    (tmp_path / "head").mkdir()
    (tmp_path / "worker").mkdir()
    planes = (*NATS_PLANES, *make_pki(tmp_path / "pki")) if variant.startswith("nats") else ()
    profile = (*COMMON, *(planes or OPEN_PLANES))
    firewall = (
        not planes
    )  # the open planes get the README's rules: nftables on the head, iptables on the worker
    if firewall:
        load_readme_firewall(netns_pair.head, "nft", WORKER_IP)
        load_readme_firewall(netns_pair.worker, "iptables", HEAD_IP)
        ip("-n", netns_pair.worker, "addr", "add", f"{STRANGER_AT_WORKER}/32", "dev", netns_pair.worker_dev)
        ip("-n", netns_pair.head, "addr", "add", f"{STRANGER_AT_HEAD}/32", "dev", netns_pair.head_dev)
    head = Node(netns_pair.head, (*profile, "--role", "head", "--advertise", HEAD_IP), tmp_path / "head")
    # No --advertise: the worker node finds its own address as the route toward the head.
    worker = Node(netns_pair.worker, (*profile, "--role", "worker", "--head", HEAD_IP), tmp_path / "worker")
    at_head, at_worker = NetnsClient(netns_pair.head), NetnsClient(netns_pair.worker)
    try:
        # `check` on a worker node asks the head's etcd; with no head yet it fails, exit 3.
        check = [
            "ip",
            "netns",
            "exec",
            netns_pair.worker,
            CLI,
            "check",
            *profile,
            "--role",
            "worker",
            "--head",
            HEAD_IP,
            "--json",
        ]
        down = subprocess.run(
            check, check=False, capture_output=True, text=True, env=worker.env(), timeout=120
        )
        found = {f["check"]: f for f in reversed(json.loads(down.stdout))}  # the first of each check
        # The worker node's open listeners are named; with NATS planes there are none (the token).
        open_planes = [f["message"] for f in json.loads(down.stdout) if f["check"] == "transport"][1:]
        if planes:
            assert open_planes == [], open_planes
        else:
            [warned] = open_planes
            assert f"TCP request plane on {WORKER_IP}" in warned and "ZMQ event plane" in warned
        assert down.returncode == 3 and found["discovery"]["status"] == "fail", down.stdout
        assert f"http://{HEAD_IP}:{BASE + 379}" in found["discovery"]["message"]
        assert found["transport"]["status"] == "fail"  # no copy of the head's credentials yet
        assert "cluster-credentials is missing" in found["transport"]["message"]

        head.start()
        wait_for(
            lambda: any(e["process"] == "frontend" for e in head.events("process running")),
            30,
            interval=0.1,
            what="the head's etcd and frontend running",
        )
        infra = ["etcd", "nats"] if planes else ["etcd"]
        assert [e["process"] for e in head.events("process starting")] == [*infra, "frontend"]
        assert at_head.get(READY_URL)[0] != 200  # no workers anywhere yet
        status, body = at_worker.get(f"http://{HEAD_IP}:{BASE + 379}/health")  # across the veth
        assert status == 200 and json.loads(body)["health"] == "true"
        # Before the hand-over a worker node refuses to start: preflight fails (exit 3), nothing runs
        # (past `--skip-check transport`, `up` itself refuses: exit 2, see tests/engine/test_etcd_auth.py).
        bare = subprocess.run(
            ["ip", "netns", "exec", netns_pair.worker, CLI, "up", *worker.args, "--skip-check", "engine"],
            check=False,
            capture_output=True,
            text=True,
            env=worker.env(),
            timeout=120,
        )
        assert bare.returncode == 3 and "cluster-credentials is missing: copy the head's" in bare.stderr, (
            bare.stderr
        )
        secrets = hand_over_credentials(head, worker)
        # Anonymous clients on the network are refused: etcd's auth is on, nats-server wants the token.
        put = {"key": "a2V5", "value": "dmFsdWU="}
        refused = at_worker.post(f"http://{HEAD_IP}:{BASE + 379}/v3/kv/put", put)
        assert refused[0] != 200 and "user name is empty" in refused[1], refused
        if planes:
            assert "Authorization Violation" in at_worker.nats_hello(HEAD_IP, BASE + 422)
        up = subprocess.run(check, check=False, capture_output=True, text=True, env=worker.env(), timeout=120)
        found = {f["check"]: f for f in reversed(json.loads(up.stdout))}  # the first of each check
        assert found["discovery"]["status"] == "ok", found["discovery"]
        assert found["transport"]["status"] == "ok", found["transport"]

        joined = time.monotonic()
        worker.start()
        wait_for(lambda: worker.said("ready:"), 30, interval=0.1, what="the worker node ready")
        wait_for(
            lambda: at_head.get(READY_URL)[0] == 200, 30, interval=0.1, what="the model ready at the head"
        )
        ready_s = time.monotonic() - joined
        wait_for(
            lambda: head.said("ready:"), 30, interval=0.1, what="the head's gate (ready + smoke request)"
        )
        for _ in range(3):
            status, text = at_head.chat()
            assert status == 200, text
            assert json.loads(text)["usage"]["completion_tokens"] > 0
        if (
            planes
        ):  # the response stream crossed the veth under mutual TLS; a client without a certificate is refused
            frontend = next(e["pid"] for e in head.events("process running") if e["process"] == "frontend")
            log = (head.tmp / "state" / "demo" / "logs" / "frontend.log").read_text(errors="replace")
            assert "client certificates required" in log
            # psutil reads the socket table of our own namespace: ask ss inside the head's.
            table = subprocess.run(
                ["ip", "netns", "exec", netns_pair.head, "ss", "-Htlnp"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            stream = [
                int(line.split()[3].rsplit(":", 1)[1])
                for line in table.splitlines()
                if f"pid={frontend}," in line and line.split()[3].startswith(f"{HEAD_IP}:")
            ]
            assert stream, f"the frontend's response stream does not listen on {HEAD_IP}: {table}"
            for port in stream:
                pki = tmp_path / "pki"
                assert at_worker.tls_client(HEAD_IP, port, pki, certificate=True) == "held open"
                refused = at_worker.tls_client(HEAD_IP, port, pki, certificate=False)
                assert refused.startswith("refused"), refused
                print(f"response stream {HEAD_IP}:{port}, no client certificate: {refused}")
        if firewall:  # served under the rules; a stranger reaches the head's API and nothing else
            seen = {}
            for netns, node_ip, client, allowed, stranger in (
                (netns_pair.head, HEAD_IP, at_worker, WORKER_IP, STRANGER_AT_WORKER),
                (netns_pair.worker, WORKER_IP, at_head, HEAD_IP, STRANGER_AT_HEAD),
            ):
                assert not listening_beyond_loopback(netns, "u"), (
                    f"{netns}: UDP beyond loopback, the rule drops TCP only"
                )
                exposed = listening_beyond_loopback(netns, "t")
                print(f"{netns} listens beyond loopback:", *exposed.values(), sep="\n")
                ports = sorted(exposed)
                seen[node_ip] = (
                    client.connect(node_ip, ports, source=allowed),
                    client.connect(node_ip, ports, source=stranger),
                )
            print("from the other node, from a stranger:", seen)
            (head_node, head_stranger), (worker_node, worker_stranger) = seen[HEAD_IP], seen[WORKER_IP]
            assert {BASE, BASE + 379} <= head_node.keys() and len(worker_node) >= 2, seen
            assert set(head_node.values()) == set(worker_node.values()) == {"connected"}, seen
            assert head_stranger.pop(BASE) == "connected", seen  # the API the rule opens
            assert set(head_stranger.values()) == set(worker_stranger.values()) == {"timed out"}, seen
        # The workers really are in the other namespace, serving through the veth.
        assert worker.events("process running") and not [
            e for e in head.events("process starting") if e["process"] in ("decode", "prefill")
        ]

        assert worker.proc is not None and "lmcache-supervise" in " ".join(
            psutil.Process(worker.proc.pid).cmdline()
        )
        killed = time.monotonic()
        worker.stop(signal.SIGKILL)  # the guardian takes decode and prefill down with it, unregistered
        wait_for(
            lambda: at_head.get(READY_URL)[0] not in (200, 0),
            10 * LEASE_TTL_S,
            interval=0.1,
            what="the head to drop the killed worker node",
        )
        dropped_s = time.monotonic() - killed
        assert dropped_s >= 0.5 * LEASE_TTL_S  # the lease, not an orderly deregistration, removed them

        rejoined = time.monotonic()
        worker.start()
        wait_for(lambda: at_head.get(READY_URL)[0] == 200, 30, interval=0.1, what="the model ready again")
        again_s = time.monotonic() - rejoined
        status, text = at_head.chat()
        assert status == 200, text
        assert_never_shown(secrets, head, worker)
        print(
            f"two hosts ({variant}): worker node ready at the head in {ready_s:.1f} s; killed worker node dropped in "
            f"{dropped_s:.1f} s (lease {LEASE_TTL_S} s); ready again in {again_s:.1f} s; "
            f"whole test {time.monotonic() - started:.1f} s"
        )
    finally:
        at_head.close()
        at_worker.close()
        worker.stop()
        head.stop()
