"""The PKI on disk: layout, modes, idempotence, renewal, validation, crashes.

No root needed except where marked; time comes from an injected clock, so
"a year later" takes no time at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from qvmd import fsutil
from qvmd.errors import Failed, InvalidArgument, NotFound, PermissionDenied
from qvmd.model import default_lab
from qvmd.pki import LabPki, builder, export_public, store, validate_cert_name
from qvmd.pki.hostnames import validate_issue_options

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LAB = default_lab()
GUESTS = ("cp", "wk-1", "wk-2")


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, days: float) -> None:
        self.now += timedelta(days=days)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def qvm_dir(tmp_path: Path) -> Path:
    return tmp_path / "qvm"


@pytest.fixture
def pki(qvm_dir: Path, clock: Clock) -> LabPki:
    return LabPki(qvm_dir, LAB, clock=clock)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root: inode, mtime, mode, size and link target."""
    out: dict[str, tuple[Any, ...]] = {}
    if not os.path.lexists(root):
        return out
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        st = p.lstat()
        target = os.readlink(p) if p.is_symlink() else None
        out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_mode, st.st_size, target)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def host_pair(pki: LabPki, name: str) -> tuple[x509.Certificate, builder.PrivateKey]:
    paths = pki.host_paths(name)
    return load_cert(paths.cert), builder.load_key(paths.key.read_bytes())


# --- layout -------------------------------------------------------------------


def test_layout_modes_and_ownership(pki: LabPki, qvm_dir: Path) -> None:
    pki.ensure()
    uid = os.geteuid()
    expect = {
        "certs": 0o755,
        "certs/ca": 0o700,
        "certs/ca/qvm-ca.pem": 0o644,
        "certs/ca/qvm-ca.key": 0o600,
        "certs/hosts": 0o755,
        "ca-cert": 0o755,
        "ca-cert/qvm-ca.pem": 0o644,
    }
    for rel, want in expect.items():
        path = qvm_dir / rel
        assert mode(path) == want, f"{rel}: mode {mode(path):o}, want {want:o}"
        assert path.lstat().st_uid == uid, f"{rel} not owned by uid {uid}"
    for guest in GUESTS:
        paths = pki.host_paths(guest)
        assert paths.directory.is_symlink(), f"hosts/{guest} must be the switchable link"
        assert paths.directory.resolve().parent == qvm_dir / "certs/hosts/.versions" / guest
        assert mode(paths.directory.resolve()) == 0o755
        assert mode(paths.key) == 0o600, f"{guest} key.pem must be 0600"
        assert mode(paths.cert) == 0o644 and mode(paths.fullchain) == 0o644
        assert paths.key.stat().st_uid == uid
    ca_pem = (qvm_dir / "ca-cert/qvm-ca.pem").read_bytes()
    assert ca_pem == (qvm_dir / "certs/ca/qvm-ca.pem").read_bytes() == pki.ca_pem()
    assert b"PRIVATE" not in ca_pem


def test_hash_link_is_what_openssl_computes(pki: LabPki, qvm_dir: Path) -> None:
    pki.ensure()
    public = qvm_dir / "ca-cert/qvm-ca.pem"
    digest = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(public)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert pki.ca_info().subject_hash == digest
    links = {p.name: os.readlink(p) for p in (qvm_dir / "ca-cert").iterdir() if p.is_symlink()}
    assert links == {f"{digest}.0": "qvm-ca.pem"}


def test_host_files_are_a_consistent_chain(pki: LabPki) -> None:
    pki.ensure()
    ca = x509.load_pem_x509_certificate(pki.ca_pem())
    for guest in LAB.guests:
        cert, key = host_pair(pki, guest.name)
        assert builder.key_matches(cert, key)
        assert builder.issued_by(cert, ca)
        assert builder.san_values(cert) == (guest.fqdn, str(guest.ip))
        chain = x509.load_pem_x509_certificates(pki.host_paths(guest.name).fullchain.read_bytes())
        assert chain == [cert, ca]


# --- idempotence ----------------------------------------------------------------


def test_second_ensure_writes_nothing(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    first = pki.ensure()
    assert any(c.startswith("created CA") for c in first)
    assert {c.split(":")[0] for c in first if c.endswith(": issued")} == set(GUESTS)
    before = snapshot(qvm_dir)
    clock.advance(days=100)
    assert pki.ensure() == []
    assert snapshot(qvm_dir) == before
    # A new instance (a restarted qvmd) reuses everything as well.
    assert LabPki(qvm_dir, LAB, clock=clock).ensure() == []
    assert snapshot(qvm_dir) == before


def test_ca_is_created_once(qvm_dir: Path, clock: Clock) -> None:
    LabPki(qvm_dir, LAB, clock=clock).ensure()
    fingerprint = LabPki(qvm_dir, LAB, clock=clock).ca_info().fingerprint_sha256
    clock.advance(days=500)
    changes = LabPki(qvm_dir, LAB, clock=clock).ensure()
    assert not any("CA" in c for c in changes)
    assert LabPki(qvm_dir, LAB, clock=clock).ca_info().fingerprint_sha256 == fingerprint


def test_ca_pem_before_the_ca_exists(pki: LabPki, qvm_dir: Path) -> None:
    with pytest.raises(NotFound):
        pki.ca_pem()
    with pytest.raises(NotFound):
        pki.ca_info()
    assert not qvm_dir.exists(), "reading must not create anything"


# --- renewal and reissue ----------------------------------------------------------


def test_renewal_inside_the_window_only(pki: LabPki, clock: Clock) -> None:
    pki.ensure()
    serials = {g: host_pair(pki, g)[0].serial_number for g in GUESTS}
    clock.advance(days=397 - 31)  # 31 days left: outside the 30-day window
    assert pki.ensure() == []
    clock.advance(days=2)  # 29 days left
    changes = pki.ensure()
    assert sorted(c.split(":")[0] for c in changes) == sorted(GUESTS)
    assert all("renewed: expires on" in c for c in changes), changes
    for g in GUESTS:
        cert, key = host_pair(pki, g)
        assert cert.serial_number != serials[g]
        assert builder.key_matches(cert, key)
        assert cert.not_valid_after_utc == clock.now + timedelta(days=397)
    assert pki.ensure() == []


def test_renewal_window_is_configurable(qvm_dir: Path, clock: Clock) -> None:
    pki = LabPki(qvm_dir, LAB, clock=clock, lifetime_days=90, renew_days=60)
    pki.ensure()
    assert host_pair(pki, "cp")[0].not_valid_after_utc == T0 + timedelta(days=90)
    clock.advance(days=29)
    assert pki.ensure() == []
    clock.advance(days=2)
    assert len(pki.ensure()) == len(GUESTS)


def test_expired_certificate_is_renewed(pki: LabPki, clock: Clock) -> None:
    pki.ensure()
    clock.advance(days=1000)
    info = {c.name: c for c in pki.list_certs()}
    assert info["cp"].days_left < 0
    changes = pki.ensure()
    assert all("renewed: expired on" in c for c in changes), changes
    assert {c.name: c.days_left for c in pki.list_certs()} == {g: 397 for g in GUESTS}


def test_no_renewal_churn_when_the_ca_expires_first(qvm_dir: Path, clock: Clock) -> None:
    pki = LabPki(qvm_dir, LAB, clock=clock, ca_lifetime_days=400)
    pki.ensure()
    clock.advance(days=380)
    assert len(pki.ensure()) == len(GUESTS)  # renewed up to the CA's end
    ca_end = pki.ca_info().not_after
    assert host_pair(pki, "cp")[0].not_valid_after_utc == ca_end
    clock.advance(days=5)
    assert pki.ensure() == [], "renewing again cannot give a later expiry"


def test_expired_ca_is_reported(qvm_dir: Path, clock: Clock) -> None:
    pki = LabPki(qvm_dir, LAB, clock=clock, ca_lifetime_days=400)
    pki.ensure()
    clock.advance(days=401)
    with pytest.raises(Failed, match="CA expired"):
        pki.ensure()


def test_reissue_when_a_guest_ip_changes(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    pki.ensure()
    wk1_before = snapshot(qvm_dir / "certs/hosts/.versions/wk-1")
    guests = tuple(
        dataclasses.replace(g, ip=IPv4Address("10.42.0.20")) if g.name == "cp" else g
        for g in LAB.guests
    )
    moved = LabPki(qvm_dir, dataclasses.replace(LAB, guests=guests), clock=clock)
    changes = moved.ensure()
    assert len(changes) == 1 and changes[0].startswith("cp: reissued: names changed"), changes
    assert "10.42.0.10" in changes[0] and "10.42.0.20" in changes[0]
    assert builder.san_values(host_pair(moved, "cp")[0]) == ("cp.qvm0.lan", "10.42.0.20")
    assert snapshot(qvm_dir / "certs/hosts/.versions/wk-1") == wk1_before
    assert moved.ensure() == []


def test_reissue_when_a_guest_name_changes(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    pki.ensure()
    guests = tuple(
        dataclasses.replace(g, fqdn="kube.qvm0.lan") if g.name == "cp" else g for g in LAB.guests
    )
    renamed = LabPki(qvm_dir, dataclasses.replace(LAB, guests=guests), clock=clock)
    assert [c.split(":")[0] for c in renamed.ensure()] == ["cp"]
    assert builder.san_values(host_pair(renamed, "cp")[0]) == ("kube.qvm0.lan", "10.42.0.10")


def test_new_ca_means_new_host_certs(pki: LabPki, qvm_dir: Path) -> None:
    pki.ensure()
    shutil.move(qvm_dir / "certs/ca", qvm_dir / "old-ca")
    changes = pki.ensure()
    assert any(c.startswith("created CA") for c in changes)
    assert sum("signed by another CA" in c for c in changes) == len(GUESTS)
    ca = x509.load_pem_x509_certificate(pki.ca_pem())
    assert builder.issued_by(host_pair(pki, "cp")[0], ca)


def test_key_type_change_reissues_hosts_but_keeps_the_ca(qvm_dir: Path, clock: Clock) -> None:
    LabPki(qvm_dir, LAB, clock=clock).ensure()
    rsa = LabPki(qvm_dir, LAB, clock=clock, key_type="rsa")
    changes = rsa.ensure()
    assert sorted(changes) == sorted(f"{g}: reissued: key type is now rsa" for g in GUESTS)
    assert rsa.ca_info().key_type == "EC secp256r1"
    assert {c.key_type for c in rsa.list_certs()} == {"RSA 3072"}


def test_rsa_lab(qvm_dir: Path, clock: Clock) -> None:
    pki = LabPki(qvm_dir, LAB, clock=clock, key_type="rsa")
    pki.ensure()
    assert pki.ca_info().key_type == "RSA 3072"
    cert, key = host_pair(pki, "cp")
    assert builder.describe_key(key) == "RSA 3072" and builder.key_matches(cert, key)


def test_domain_change_needs_a_new_ca(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    pki.ensure()
    other = dataclasses.replace(
        LAB,
        domain="lab.test",
        guests=tuple(dataclasses.replace(g, fqdn=f"{g.name}.lab.test") for g in LAB.guests),
    )
    before = snapshot(qvm_dir)
    with pytest.raises(Failed, match=r"move .* away to create a new CA"):
        LabPki(qvm_dir, other, clock=clock).ensure()
    assert snapshot(qvm_dir) == before


# --- the issue request ----------------------------------------------------------


def test_issue_maps_guest_names_to_the_guest_cert(pki: LabPki) -> None:
    first = pki.issue("cp")
    assert first.reason == "issued" and first.info.guest == "cp"
    for alias in ("cp.qvm0.lan", "CP.QVM0.LAN.", "10.42.0.10"):
        again = pki.issue(alias)
        assert again.reason is None, alias
        assert again.info.serial == first.info.serial
        assert again.paths == pki.host_paths("cp")
    assert pki.issue("cp", {"force": True}).info.serial != first.info.serial


def test_issue_returns_a_matching_pair(pki: LabPki) -> None:
    issued = pki.issue("registry", {})
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert builder.key_matches(cert, builder.load_key(issued.key_pem))
    assert issued.paths.cert.read_bytes() == issued.cert_pem
    assert issued.paths.key.read_bytes() == issued.key_pem
    assert issued.paths.fullchain.read_bytes() == issued.fullchain_pem
    assert issued.fullchain_pem == issued.cert_pem + pki.ca_pem()
    assert "PRIVATE KEY" not in repr(issued), "the key must not end up in logs"


def test_issue_other_lab_names(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    dns = pki.issue("registry")
    assert dns.info.name == "registry.qvm0.lan" and dns.info.guest is None
    assert dns.info.sans == ("registry.qvm0.lan",)
    ip = pki.issue("10.42.0.50")
    assert ip.info.name == "10.42.0.50" and ip.info.sans == ("10.42.0.50",)
    deep = pki.issue("api.k8s.qvm0.lan")
    assert deep.info.sans == ("api.k8s.qvm0.lan",)
    assert {c.name for c in pki.list_certs()} == {
        "10.42.0.50",
        "api.k8s.qvm0.lan",
        "registry.qvm0.lan",
    }
    # ensure() issues the guests and, later, renews the others too.
    assert len(pki.ensure()) == len(GUESTS)
    clock.advance(days=390)
    renewed = {c.split(":")[0] for c in pki.ensure()}
    assert renewed == {*GUESTS, "10.42.0.50", "api.k8s.qvm0.lan", "registry.qvm0.lan"}


def test_list_certs(pki: LabPki, clock: Clock, qvm_dir: Path) -> None:
    assert pki.list_certs() == []
    pki.ensure()
    clock.advance(days=10.5)
    certs = pki.list_certs()
    assert [c.name for c in certs] == sorted(GUESTS)
    cp = certs[0]
    assert cp.guest == "cp" and cp.subject == "CN=cp.qvm0.lan"
    assert cp.sans == ("cp.qvm0.lan", "10.42.0.10")
    assert cp.days_left == 386 and cp.not_after == T0 + timedelta(days=397)
    assert cp.path == qvm_dir / "certs/hosts/cp/cert.pem"
    assert cp.key_type == "EC secp256r1"
    # A guest removed from the lab keeps its files (removing keys is the
    # admin's call) and is listed as no longer belonging to a guest.
    smaller = LabPki(qvm_dir, dataclasses.replace(LAB, guests=LAB.guests[:2]), clock=clock)
    assert smaller.ensure() == []
    assert {c.name: c.guest for c in smaller.list_certs()}["wk-2"] is None


def test_ca_info(pki: LabPki, qvm_dir: Path, clock: Clock) -> None:
    pki.ensure()
    info = pki.ca_info()
    assert info.subject == "CN=qvm lab CA qvm0.lan,O=qvmd"
    assert info.permitted == ("DNS:qvm0.lan", "IP:10.42.0.0/24")
    assert info.excluded == () and info.constraints_critical and info.path_length == 0
    assert info.not_after == T0 + timedelta(days=3650)
    assert info.public_path == qvm_dir / "ca-cert/qvm-ca.pem"
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(info.public_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith("=" + info.fingerprint_sha256)


def test_host_paths_refuses_path_tricks(pki: LabPki) -> None:
    for bad in ("", "../ca", "a/b", ".versions", ".."):
        with pytest.raises(InvalidArgument):
            pki.host_paths(bad)


# --- refused requests write nothing -------------------------------------------

REFUSED: dict[str, object] = {
    "empty": "",
    "other domain": "example.com",
    "lab name under another domain": "cp.qvm0.lan.example.com",
    "suffix without a dot": "evilqvm0.lan",
    "the domain itself": "qvm0.lan",
    "wildcard": "*.qvm0.lan",
    "bare wildcard": "*",
    "partial wildcard": "cp*.qvm0.lan",
    "ip outside subnet": "10.42.1.5",
    "public ip": "8.8.8.8",
    "network address": "10.42.0.0",
    "broadcast address": "10.42.0.255",
    "leading zeros": "010.042.000.010",
    "octet over 255": "10.42.0.256",
    "ipv6": "::1",
    "ipv6 scoped": "fe80::1%qvm0",
    "over-long label": "a" * 64 + ".qvm0.lan",
    "over-long bare label": "a" * 64,
    "over-long name": "a." * 125 + "qvm0.lan",
    "huge": "x" * 100_000,
    "empty label": "cp..qvm0.lan",
    "leading dot": ".cp.qvm0.lan",
    "leading hyphen": "-cp.qvm0.lan",
    "trailing hyphen": "cp-.qvm0.lan",
    "underscore": "cp_1.qvm0.lan",
    "nul byte": "cp.qvm0.lan\x00",
    "nul in the middle": "cp\x00.example.com",
    "newline": "cp\n",
    "space": " cp",
    "path": "cp.qvm0.lan/../../etc",
    "dotdot": "..",
    "non-ascii": "é.qvm0.lan",
    "surrogate escape": "cp\udcff",
    "delete char": "\x7f",
    "bytes": b"cp",
    "none": None,
    "number": 42,
    "list": ["cp"],
}


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_refused_names_write_nothing(pki: LabPki, qvm_dir: Path, label: str) -> None:
    name = REFUSED[label]
    with pytest.raises(InvalidArgument):
        pki.issue(name)
    assert not qvm_dir.exists(), f"{label}: refused request created files"
    pki.ensure()
    before = snapshot(qvm_dir)
    with pytest.raises(InvalidArgument) as err:
        pki.issue(name)
    assert snapshot(qvm_dir) == before, f"{label}: refused request changed the tree"
    assert len(str(err.value)) < 400, "messages stay short whatever the input"


@pytest.mark.parametrize(
    "options",
    [{"forc": True}, {"force": 1}, {"force": "yes"}, {1: True}, [("force", True)]],
    ids=["unknown key", "int", "str", "non-str key", "not a mapping"],
)
def test_refused_options_write_nothing(pki: LabPki, qvm_dir: Path, options: Any) -> None:
    with pytest.raises(InvalidArgument):
        pki.issue("cp", options)
    assert not qvm_dir.exists()


def test_refusal_messages_say_why() -> None:
    subnet = LAB.subnet
    cases = {
        "*.qvm0.lan": "wildcard",
        "example.com": "outside the lab domain",
        "10.42.1.5": "outside the lab subnet",
        "": "empty",
        "a" * 64 + ".qvm0.lan": "not a valid DNS label",
        "cp\x00": "only letters, digits",
        "::1": "IPv4",
    }
    for name, why in cases.items():
        with pytest.raises(InvalidArgument, match=why):
            validate_cert_name(name, LAB.domain, subnet)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("cp", "cp.qvm0.lan"),
        ("CP.QVM0.LAN.", "cp.qvm0.lan"),
        ("registry", "registry.qvm0.lan"),
        ("api.k8s.qvm0.lan", "api.k8s.qvm0.lan"),
        ("xn--bcher-kva.qvm0.lan", "xn--bcher-kva.qvm0.lan"),
        ("a" * 63, "a" * 63 + ".qvm0.lan"),
        ("10.42.0.10", IPv4Address("10.42.0.10")),
        ("10.42.0.254", IPv4Address("10.42.0.254")),
        ("10.42.0.1", IPv4Address("10.42.0.1")),
    ],
)
def test_accepted_names(name: str, want: object) -> None:
    assert validate_cert_name(name, LAB.domain, LAB.subnet) == want


def test_issue_options() -> None:
    assert validate_issue_options(None) is False
    assert validate_issue_options({}) is False
    assert validate_issue_options({"force": True}) is True


def test_bad_settings() -> None:
    for kwargs in (
        {"key_type": "dsa"},
        {"lifetime_days": 0},
        {"renew_days": 397},
        {"renew_days": -1},
        {"lifetime_days": 4000},
        {"ca_lifetime_days": 100},
    ):
        with pytest.raises(InvalidArgument):
            LabPki("/nonexistent", LAB, **kwargs)


def test_naive_clock_is_a_bug(qvm_dir: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        LabPki(qvm_dir, LAB, clock=lambda: datetime(2030, 1, 1)).ensure()


# --- concurrency ------------------------------------------------------------------


def run_together(n: int, fn: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


def test_concurrent_issue_gives_one_pair(qvm_dir: Path, clock: Clock) -> None:
    pkis = [LabPki(qvm_dir, LAB, clock=clock) for _ in range(8)]
    it = iter(pkis)
    lock = threading.Lock()

    def call() -> store.IssuedCert:
        with lock:
            pki = next(it)
        return pki.issue("registry")

    results = run_together(8, call)
    assert len({r.info.serial for r in results}) == 1, "every caller must get the same pair"
    assert sum(r.reason == "issued" for r in results) == 1
    assert len({r.info.fingerprint_sha256 for r in results}) == 1
    cert, key = host_pair(pkis[0], "registry.qvm0.lan")
    assert builder.key_matches(cert, key) and cert.serial_number == int(results[0].info.serial, 16)


def test_concurrent_forced_issue_stays_consistent(pki: LabPki, qvm_dir: Path) -> None:
    results = run_together(6, lambda: pki.issue("cp", {"force": True}))
    for r in results:
        assert builder.key_matches(
            x509.load_pem_x509_certificate(r.cert_pem), builder.load_key(r.key_pem)
        )
    cert, key = host_pair(pki, "cp")
    assert builder.key_matches(cert, key)
    assert cert.serial_number in {int(r.info.serial, 16) for r in results}
    versions = list((qvm_dir / "certs/hosts/.versions/cp").iterdir())
    assert len(versions) == 1, f"superseded versions left behind: {versions}"


def test_concurrent_processes_give_one_pair(qvm_dir: Path) -> None:
    code = (
        "import sys; from qvmd.model import default_lab; from qvmd.pki import LabPki; "
        "print(LabPki(sys.argv[1], default_lab()).issue('10.42.0.77').info.serial)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(qvm_dir)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    serials = set()
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        serials.add(out.strip())
    assert len(serials) == 1


# --- crashes ----------------------------------------------------------------------


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs."""


def test_crash_before_the_switch_keeps_the_old_pair(
    pki: LabPki, qvm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki.ensure()
    old_cert, _ = host_pair(pki, "cp")

    def crash(link: Path) -> None:
        raise Crash

    monkeypatch.setattr(store, "_check_replaceable", crash)
    with pytest.raises(Crash):
        pki.issue("cp", {"force": True})
    monkeypatch.undo()
    cert, key = host_pair(pki, "cp")
    assert cert == old_cert and builder.key_matches(cert, key)
    versions = qvm_dir / "certs/hosts/.versions/cp"
    assert len(list(versions.iterdir())) == 2, "the new version is orphaned, not half-switched"
    assert pki.ensure() == []
    assert [p.name for p in versions.iterdir()] == [pki.host_paths("cp").directory.resolve().name]


def test_crash_between_key_and_cert_keeps_the_old_pair(
    pki: LabPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki.ensure()
    old_cert, _ = host_pair(pki, "cp")
    real = fsutil.atomic_write

    def write(path: Any, data: bytes, **kw: Any) -> None:
        if Path(path).name == store.CERT:
            raise Crash
        real(path, data, **kw)

    monkeypatch.setattr(store, "atomic_write", write)
    with pytest.raises(Crash):
        pki.issue("cp", {"force": True})
    monkeypatch.undo()
    cert, key = host_pair(pki, "cp")
    assert cert == old_cert and builder.key_matches(cert, key)


def test_crash_while_creating_the_ca(
    pki: LabPki, qvm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any) -> None:
        raise Crash

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(Crash):
        pki.ensure()
    monkeypatch.undo()
    assert not (qvm_dir / "certs/ca").exists()
    with pytest.raises(NotFound):
        pki.ca_pem()
    pki.ensure()
    assert [p.name for p in (qvm_dir / "certs").iterdir() if p.name.startswith(".ca")] == []
    assert sorted(p.name for p in (qvm_dir / "certs/ca").iterdir()) == ["qvm-ca.key", "qvm-ca.pem"]


def test_dangling_or_broken_host_is_reissued(pki: LabPki, qvm_dir: Path) -> None:
    pki.ensure()
    version = pki.host_paths("wk-1").directory.resolve()
    (version / store.KEY).write_bytes(builder.key_pem(builder.generate_key("ec")))
    shutil.rmtree(pki.host_paths("wk-2").directory.resolve())
    changes = sorted(pki.ensure())
    assert changes[0].startswith("wk-1: reissued:") and "key does not belong" in changes[0]
    assert changes[1].startswith("wk-2: reissued:") and "incomplete" in changes[1]
    for g in ("wk-1", "wk-2"):
        cert, key = host_pair(pki, g)
        assert builder.key_matches(cert, key)


def test_foreign_directory_is_left_alone(pki: LabPki, qvm_dir: Path) -> None:
    (qvm_dir / "certs/hosts/wk-1").mkdir(parents=True)
    (qvm_dir / "certs/hosts/wk-1/mine.txt").write_text("user data")
    with pytest.raises(Failed, match="wk-1 is not a link made by qvmd"):
        pki.ensure()
    assert (qvm_dir / "certs/hosts/wk-1/mine.txt").read_text() == "user data"
    assert {c.name for c in pki.list_certs()} == {"cp", "wk-2"}, "the others were still issued"


@pytest.mark.parametrize("broken", ["garbage cert", "only the key", "only the cert", "wrong key"])
def test_broken_ca_is_never_replaced(pki: LabPki, qvm_dir: Path, broken: str) -> None:
    pki.ensure()
    ca_dir = qvm_dir / "certs/ca"
    if broken == "garbage cert":
        (ca_dir / "qvm-ca.pem").write_bytes(b"not a certificate")
    elif broken == "only the key":
        (ca_dir / "qvm-ca.pem").unlink()
    elif broken == "only the cert":
        (ca_dir / "qvm-ca.key").unlink()
    else:
        (ca_dir / "qvm-ca.key").write_bytes(builder.key_pem(builder.generate_key("ec")))
    before = snapshot(qvm_dir)
    fresh = LabPki(qvm_dir, LAB)
    with pytest.raises(Failed):
        fresh.ensure()
    with pytest.raises(Failed):
        fresh.issue("registry")
    assert snapshot(qvm_dir) == before


def test_ca_modes_are_repaired(pki: LabPki, qvm_dir: Path) -> None:
    pki.ensure()
    os.chmod(qvm_dir / "certs/ca/qvm-ca.key", 0o644)
    os.chmod(qvm_dir / "certs/ca", 0o755)
    changes = pki.ensure()
    assert len(changes) == 2 and all(c.startswith("set mode") for c in changes)
    assert mode(qvm_dir / "certs/ca/qvm-ca.key") == 0o600
    assert mode(qvm_dir / "certs/ca") == 0o700


# --- the public CA export ---------------------------------------------------------


@pytest.fixture
def ca_pem(pki: LabPki) -> bytes:
    pki.ensure()
    return pki.ca_pem()


def links(directory: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in directory.iterdir() if p.is_symlink()}


def test_export_matches_openssl_rehash(ca_pem: bytes, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    changes = export_public(ca_pem, ours)
    assert len(changes) == 3  # created, wrote, linked
    theirs.mkdir()
    (theirs / "qvm-ca.pem").write_bytes(ca_pem)
    subprocess.run(["openssl", "rehash", str(theirs)], check=True, capture_output=True)
    assert links(ours) == links(theirs)
    assert mode(ours) == 0o755 and mode(ours / "qvm-ca.pem") == 0o644
    before = snapshot(ours)
    assert export_public(ca_pem, ours) == []
    assert snapshot(ours) == before


def test_export_leaves_other_files_and_modes_alone(ca_pem: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir(mode=0o700)
    digest = builder.subject_hash(x509.load_pem_x509_certificate(ca_pem).subject)
    (dest / "other.pem").write_text("someone else's CA with a colliding hash")
    os.symlink("other.pem", dest / f"{digest}.0")
    os.symlink("qvm-ca.pem", dest / "00000000.0")  # ours, under an old hash
    export_public(ca_pem, dest)
    assert mode(dest) == 0o700, "an existing directory keeps its mode"
    assert links(dest) == {f"{digest}.0": "other.pem", f"{digest}.1": "qvm-ca.pem"}
    assert (dest / "other.pem").exists()


def test_export_refuses_non_certificates(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        export_public(b"-----BEGIN PRIVATE KEY-----\n", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qvt-export-"))
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_export_runs_unprivileged(ca_pem: bytes, nobody_dir: Path) -> None:
    code = (
        "import sys; from qvmd.pki import export_public; "
        "print(export_public(sys.stdin.buffer.read(), sys.argv[1]))"
    )
    dest = nobody_dir / "ca-cert"
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", code, str(dest)],
        input=ca_pem,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert (dest / "qvm-ca.pem").read_bytes() == ca_pem
    assert (dest / "qvm-ca.pem").stat().st_uid == 65534
    assert list(links(dest).values()) == ["qvm-ca.pem"]


@pytest.mark.skipif(os.geteuid() != 0, reason="checks what root refuses")
def test_root_refuses_to_export_into_a_users_directory(ca_pem: bytes, nobody_dir: Path) -> None:
    for dest in (nobody_dir, nobody_dir / "ca-cert"):
        with pytest.raises(PermissionDenied, match="as that user"):
            export_public(ca_pem, dest)
    assert list(nobody_dir.iterdir()) == []


# --- speed ------------------------------------------------------------------------


def test_ec_issue_is_fast(pki: LabPki) -> None:
    pki.ensure()
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        pki.issue("registry", {"force": True})
    per_issue = (time.perf_counter() - start) / rounds
    # Key, certificate, three fsynced files, a directory switch.
    assert per_issue < 0.05, f"an EC issue took {per_issue * 1000:.1f} ms"
