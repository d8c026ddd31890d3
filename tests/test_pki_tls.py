"""Real TLS peers against the lab CA: openssl verify, s_server and curl.

The first tests only need the `openssl` binary. The namespace tests (root)
put `openssl s_server` with cp's certificate at 10.42.0.10 in one network
namespace and run the user's two curl commands from another, joined by a
veth pair, so nothing touches the machine's own interfaces.

curl ignores SSL_CERT_DIR when CURL_CA_BUNDLE is set, and these machines
export CURL_CA_BUNDLE: every TLS client here runs with the CA variables
cleared, and only the ones a test means to use set again.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509

from qvmd.model import default_lab
from qvmd.pki import LabPki, builder
from tests.netns import netns, nsrun

LAB = default_lab()
SERVER_IP = "10.42.0.10"
CLIENT_IP = "10.42.0.100"
CA_ENV = (
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NIX_SSL_CERT_FILE",
)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CA_ENV}
    env.update(extra)
    return env


def run(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=60, env=env or clean_env()
    )


@pytest.fixture(scope="module")
def qvm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls") / "qvm"


@pytest.fixture(scope="module")
def pki(qvm_dir: Path) -> LabPki:
    pki = LabPki(qvm_dir, LAB)  # the real clock: openssl and curl check validity now
    pki.ensure()
    pki.issue("registry")
    pki.issue("10.42.0.50")
    return pki


def ca_key(qvm_dir: Path) -> builder.PrivateKey:
    return builder.load_key((qvm_dir / "certs/ca/qvm-ca.key").read_bytes())


def rogue_cert(qvm_dir: Path, dns: list[str], ips: list[str], out: Path) -> tuple[Path, Path]:
    """Sign a certificate with the lab CA directly, bypassing qvmd's checks."""
    ca_cert = x509.load_pem_x509_certificate((qvm_dir / "certs/ca/qvm-ca.pem").read_bytes())
    key = builder.generate_key("ec")
    cert = builder.build_host_cert(
        key.public_key(),
        ca_cert=ca_cert,
        ca_key=ca_key(qvm_dir),
        dns_names=dns,
        ips=[IPv4Address(i) for i in ips],
        now=datetime.now(UTC),
        lifetime_days=30,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(builder.cert_pem(cert))
    (out / "key.pem").write_bytes(builder.key_pem(key))
    return out / "cert.pem", out / "key.pem"


def verify_with_file(qvm_dir: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    ca = qvm_dir / "ca-cert/qvm-ca.pem"
    return run(
        ["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(ca), *extra, str(cert)]
    )


def verify_with_dir(qvm_dir: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # -CApath finds the CA only through the <hash>.0 link.
    ca_dir = qvm_dir / "ca-cert"
    return run(
        [
            "openssl",
            "verify",
            "-no-CAfile",
            "-no-CAstore",
            "-CApath",
            str(ca_dir),
            *extra,
            str(cert),
        ]
    )


# --- openssl, no root -------------------------------------------------------------


def test_openssl_verifies_every_issued_cert(pki: LabPki, qvm_dir: Path) -> None:
    certs = pki.list_certs()
    assert {c.name for c in certs} == {"cp", "wk-1", "wk-2", "registry.qvm0.lan", "10.42.0.50"}
    for info in certs:
        for purpose in ("sslserver", "sslclient"):
            for verify in (verify_with_file, verify_with_dir):
                res = verify(qvm_dir, info.path, "-purpose", purpose)
                assert res.returncode == 0, f"{info.name} ({purpose}): {res.stdout}{res.stderr}"
        for san in info.sans:
            flag = "-verify_ip" if san[0].isdigit() else "-verify_hostname"
            res = verify_with_file(qvm_dir, info.path, flag, san)
            assert res.returncode == 0, f"{info.name} for {san}: {res.stdout}{res.stderr}"
        res = verify_with_file(qvm_dir, info.path, "-verify_hostname", "other.qvm0.lan")
        assert res.returncode != 0, f"{info.name} must not match other.qvm0.lan"


def test_openssl_sees_critical_constraints(pki: LabPki, qvm_dir: Path) -> None:
    text = run(["openssl", "x509", "-noout", "-text", "-in", str(qvm_dir / "ca-cert/qvm-ca.pem")])
    lines = [line.strip() for line in text.stdout.splitlines()]

    def after(header: str) -> list[str]:
        i = lines.index(header)
        return lines[i + 1 : i + 4]

    assert "X509v3 Name Constraints: critical" in lines
    permitted = after("X509v3 Name Constraints: critical")
    assert permitted[:3] == ["Permitted:", "DNS:qvm0.lan", "IP:10.42.0.0/255.255.255.0"]
    assert "X509v3 Basic Constraints: critical" in lines
    assert after("X509v3 Basic Constraints: critical")[0] == "CA:TRUE, pathlen:0"
    assert "X509v3 Key Usage: critical" in lines
    assert after("X509v3 Key Usage: critical")[0] == "Certificate Sign, CRL Sign"
    assert "X509v3 Subject Key Identifier:" in lines
    assert "X509v3 Authority Key Identifier:" in lines
    assert "Public-Key: (256 bit)" in lines


@pytest.mark.parametrize(
    ("dns", "ips"),
    [
        (["evil.example.com"], []),
        ([], ["192.168.1.10"]),
        (["cp.qvm0.lan.example.com"], []),
        # Even one foreign name among good ones spoils the certificate; this
        # is why guests' short names (`cp`) are not in their SANs.
        (["cp", "cp.qvm0.lan"], [SERVER_IP]),
    ],
    ids=["other domain", "other subnet", "lab name as a prefix", "short name"],
)
def test_openssl_rejects_names_outside_the_constraints(
    pki: LabPki, qvm_dir: Path, tmp_path: Path, dns: list[str], ips: list[str]
) -> None:
    cert, _ = rogue_cert(qvm_dir, dns, ips, tmp_path)
    for verify in (verify_with_file, verify_with_dir):
        res = verify(qvm_dir, cert)
        assert res.returncode != 0, f"{dns + ips} verified: {res.stdout}"
        assert "permitted subtree violation" in res.stdout + res.stderr, res.stdout + res.stderr


def test_rsa_lab_verifies(tmp_path: Path) -> None:
    qvm_dir = tmp_path / "qvm"
    pki = LabPki(qvm_dir, LAB, key_type="rsa")
    pki.ensure()
    for info in pki.list_certs():
        res = verify_with_dir(qvm_dir, info.path, "-purpose", "sslserver")
        assert res.returncode == 0, f"{info.name}: {res.stdout}{res.stderr}"
        assert info.key_type == "RSA 3072"


# --- real peers in namespaces (root) ----------------------------------------------


@pytest.fixture
def peers() -> Iterator[tuple[str, str]]:
    """(server namespace at 10.42.0.10, client namespace at 10.42.0.100)."""
    with netns("s") as server, netns("c") as client:
        nsrun(
            server, "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", client
        )
        nsrun(server, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", "va")
        nsrun(client, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "vb")
        nsrun(server, "ip", "link", "set", "va", "up")
        nsrun(client, "ip", "link", "set", "vb", "up")
        yield server, client


@contextmanager
def s_server(ns: str, cert: Path, key: Path, *extra: str) -> Iterator[None]:
    """`openssl s_server -www` on port 443 in `ns`, killed on the way out."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "openssl", "s_server", "-accept", "443", "-www",
             "-cert", str(cert), "-key", str(key), *extra],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not nsrun(ns, "ss", "-Hltn", "sport = :443").stdout.strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"s_server did not start: {log.read()!r}")
                time.sleep(0.02)
            yield
        finally:
            proc.kill()
            proc.wait(timeout=10)


def curl(ns: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(
        ["ip", "netns", "exec", ns, "curl", "--silent", "--show-error", "--max-time", "10",
         "--output", "/dev/null", "--write-out", "%{http_code}", *args],
        env=clean_env(**env),
    )  # fmt: skip


RESOLVE = f"cp.qvm0.lan:443:{SERVER_IP}"


def cacert_args(path: Path) -> list[str]:
    """The user's `--cacert="FILE"` where this curl understands it.

    Only recent curl parses `--option=value` (curl/curl#17789, 2025); older
    ones, like Debian 12's 7.88, reject the glued form as an unknown option
    and need `--cacert FILE`.
    """
    probe = run(["curl", "--max-time=1", "--version"])
    return [f"--cacert={path}"] if probe.returncode == 0 else ["--cacert", str(path)]


@pytest.mark.root
@root_only
def test_both_user_commands_work(pki: LabPki, qvm_dir: Path, peers: tuple[str, str]) -> None:
    server, client = peers
    paths = pki.host_paths("cp")
    public = qvm_dir / "ca-cert"
    with s_server(server, paths.cert, paths.key):
        # curl --cacert="${QVM_DIR}/ca-cert/qvm-ca.pem" https://cp.qvm0.lan
        res = curl(
            client, "--resolve", RESOLVE, *cacert_args(public / "qvm-ca.pem"), "https://cp.qvm0.lan"
        )
        assert (res.returncode, res.stdout) == (0, "200"), f"--cacert: {res.stderr}"
        # export SSL_CERT_DIR="${QVM_DIR}"/ca-cert; curl https://cp.qvm0.lan
        res = curl(client, "--resolve", RESOLVE, "https://cp.qvm0.lan", SSL_CERT_DIR=str(public))
        assert (res.returncode, res.stdout) == (0, "200"), f"SSL_CERT_DIR: {res.stderr}"
        # The address is in the certificate as well.
        res = curl(client, *cacert_args(public / "qvm-ca.pem"), f"https://{SERVER_IP}")
        assert (res.returncode, res.stdout) == (0, "200"), f"by address: {res.stderr}"
        # Without the lab CA, the system's trust store must not accept it.
        res = curl(client, "--resolve", RESOLVE, "https://cp.qvm0.lan")
        assert res.returncode == 60, f"curl without the CA: rc {res.returncode} {res.stderr}"
        res = curl(
            client,
            "--resolve",
            RESOLVE,
            "https://cp.qvm0.lan",
            CURL_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt",
        )
        assert res.returncode == 60, "the machine's bundle must not trust the lab CA"


@pytest.mark.root
@root_only
def test_client_certificate_is_accepted(pki: LabPki, qvm_dir: Path, peers: tuple[str, str]) -> None:
    # clientAuth: wk-1's certificate authenticates to a server that demands one.
    server, client = peers
    cp, wk1 = pki.host_paths("cp"), pki.host_paths("wk-1")
    ca = qvm_dir / "ca-cert/qvm-ca.pem"
    with s_server(
        server, cp.cert, cp.key, "-Verify", "1", "-verify_return_error", "-CAfile", str(ca)
    ):
        res = curl(client, "--resolve", RESOLVE, *cacert_args(ca), "https://cp.qvm0.lan")
        assert res.returncode != 0, "the server must demand a client certificate"
        res = curl(
            client, "--resolve", RESOLVE, *cacert_args(ca),
            "--cert", str(wk1.cert), "--key", str(wk1.key), "https://cp.qvm0.lan",
        )  # fmt: skip
        assert (res.returncode, res.stdout) == (0, "200"), f"client certificate: {res.stderr}"


@pytest.mark.root
@root_only
def test_curl_rejects_a_foreign_name_signed_by_the_lab_ca(
    pki: LabPki, qvm_dir: Path, peers: tuple[str, str], tmp_path: Path
) -> None:
    server, client = peers
    cert, key = rogue_cert(qvm_dir, ["evil.example.com"], [], tmp_path)
    public = qvm_dir / "ca-cert"
    resolve = f"evil.example.com:443:{SERVER_IP}"
    with s_server(server, cert, key):
        res = curl(
            client,
            "--resolve",
            resolve,
            *cacert_args(public / "qvm-ca.pem"),
            "https://evil.example.com",
        )
        assert res.returncode == 60, f"--cacert: rc {res.returncode}"
        assert "permitted subtree violation" in res.stderr, res.stderr
        res = curl(
            client, "--resolve", resolve, "https://evil.example.com", SSL_CERT_DIR=str(public)
        )
        assert res.returncode == 60, f"SSL_CERT_DIR: rc {res.returncode}"
        assert "permitted subtree violation" in res.stderr, res.stderr
