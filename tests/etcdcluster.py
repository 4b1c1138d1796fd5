"""A real etcd cluster for the tests: members on 127.0.0.1, free ports, data
on tmpfs (/dev/shm when there is one: fsync is then cheap, which keeps the
suite fast; the Raft protocol, elections and leases are the real ones).

A test may kill -9 a member (``kill``), SIGSTOP it, start it again
(``start``) and ask which one leads (``leader``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from typing import List, Optional

from servers import PortTaken, free_port, on_a_free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def available() -> bool:
    return os.path.exists(ETCD)


def _json_post(url: str, payload: dict, timeout: float = 2.0, context: Optional[ssl.SSLContext] = None,
               headers: Optional[dict] = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
        return json.loads(r.read())


class TLSFiles:
    """A CA, and a certificate for 127.0.0.1 good for both server and client
    use (etcd's gateway presents it to etcd itself), made with cryptography."""

    def __init__(self, directory: str) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("dx test CA")).issuer_name(name("dx test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca = os.path.join(directory, "ca.pem")
        self.cert = os.path.join(directory, "cert.pem")
        self.key = os.path.join(directory, "key.pem")
        with open(self.ca, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        with open(self.cert, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        os.chmod(self.key, 0o600)

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        return context


class Member:
    def __init__(self, name: str, data_dir: str, scheme: str = "http") -> None:
        self.name = name
        self.scheme = scheme
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.member_id: Optional[str] = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` etcd members forming one cluster on loopback."""

    def __init__(self, size: int = 3, heartbeat_ms: int = 50, election_ms: int = 500,
                 extra_args: tuple = (), tls: bool = False) -> None:
        if not available():
            raise RuntimeError("etcd is not installed: apt-get install -y etcd-server")
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="dx-etcd-", dir=base)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.extra_args = extra_args
        self.token = f"dx-{os.getpid()}-{time.monotonic_ns()}"
        self.tls = TLSFiles(self.dir) if tls else None
        self.context = self.tls.context() if self.tls is not None else None
        if self.tls is not None:
            self.extra_args = tuple(extra_args) + (
                "--cert-file", self.tls.cert, "--key-file", self.tls.key, "--trusted-ca-file", self.tls.ca,
                "--client-cert-auth")
        self.size = size
        self.scheme = "https" if tls else "http"
        self.attempts = 0
        on_a_free_port(self._start_members)

    def _start_members(self) -> None:
        """A new cluster on new ports; PortTaken if a member could not listen."""
        self.attempts += 1
        self.members = [Member(f"m{i}", os.path.join(self.dir, f"{self.attempts}m{i}"), self.scheme)
                        for i in range(self.size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            self._spawn(member, "new")
        try:
            self.wait_healthy()
        except RuntimeError:
            if all(m.running for m in self.members):
                raise
        if not self._all_ours():
            self._kill_all()
            raise PortTaken(f"an etcd member could not listen on its ports; logs in {self.dir}")

    def _all_ours(self) -> bool:
        """Every member runs, and what answers on their ports is one cluster:
        a member whose port another test's etcd took exits, and that other
        etcd answers in its place."""
        clusters = {(self.status(m) or {}).get("header", {}).get("cluster_id") for m in self.members}
        return all(m.running for m in self.members) and len(clusters) == 1 and None not in clusters

    @property
    def endpoints(self) -> List[str]:
        return [m.url for m in self.members]

    def _spawn(self, member: Member, state: str) -> None:
        log = open(os.path.join(self.dir, f"{member.name}.log"), "ab")
        member.proc = subprocess.Popen(
            [ETCD, "--name", member.name, "--data-dir", member.data_dir,
             "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
             "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
             "--initial-cluster", self.initial, "--initial-cluster-state", state,
             "--initial-cluster-token", self.token,
             "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
             "--log-level", "warn", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def status(self, member: Member) -> Optional[dict]:
        try:
            return _json_post(f"{member.url}/v3/maintenance/status", {}, timeout=1.0, context=self.context)
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running member answers and the cluster has a leader that
        serves a linearizable read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            for member in self.members:
                if not member.running:
                    continue
                status = self.status(member)
                if status is None or status.get("leader", "0") == "0":
                    ok = False
                    break
                member.member_id = status["header"]["member_id"]
            if ok:
                try:
                    self.post("/v3/kv/range", {"key": "AA=="})
                    return
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd cluster not healthy after {timeout}s; logs in {self.dir}")

    def post(self, path: str, payload: dict, token: Optional[str] = None) -> dict:
        """One gateway request to the first running member."""
        headers = {"authorization": token} if token else None
        return _json_post(f"{self.running()[0].url}{path}", payload, timeout=2.0, context=self.context,
                          headers=headers)

    def running(self) -> List[Member]:
        return [m for m in self.members if m.running]

    def leader(self) -> Member:
        for member in self.running():
            status = self.status(member)
            if status is not None and status.get("leader") == status["header"]["member_id"]:
                return member
        raise RuntimeError("no leader")

    def followers(self) -> List[Member]:
        lead = self.leader()
        return [m for m in self.running() if m is not lead]

    def kill(self, member: Member) -> None:
        """kill -9: no goodbye to its peers."""
        if member.running:
            assert member.proc is not None
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait()

    def start(self, member: Member) -> None:
        """Start a killed member again on its own data."""
        if not member.running:
            self._spawn(member, "existing")

    def stop(self) -> None:
        self._kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_all(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGCONT)
                member.proc.kill()
                member.proc.wait()
