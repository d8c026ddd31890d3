"""The tiny guest boots under QEMU as an unprivileged user and serves HTTPS.

Everything is real: the image built by guests/tiny/build.sh, QEMU (TCG)
run through `setpriv` as a test user on a TAP that user owns, dnsmasq
handing out the lab's static lease, an HTTP server with NoCloud documents
carrying a certificate made here with openssl, and curl checking the
guest's HTTPS with that CA from the host side.

Topology, all inside one fresh namespace (removed at the end):

    qvm0 bridge 10.42.0.1/24 + 10.42.0.2/24 (dnsmasq DHCP, seed HTTP on :80)
      └─ qvm0tap0 (owned by the test user) ── QEMU ── guest eth0 52:54:0a:2a:00:0a

The guest's steps and their times (host clock from QEMU's start, and the
guest's own uptime) are printed; run with -s to see them.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from qvmd.model import default_lab
from qvmd.services.ganesha import (
    GaneshaPaths,
    build_ganesha_files,
    ensure_export_dirs,
    ganesha_child,
    write_ganesha_files,
)
from qvmd.services.nfs_exports import default_exports, resolve_exports
from tests.busenv import TestUsers, User
from tests.e2e.tinyguest import (
    Step,
    TinyGuestError,
    TinyImage,
    boot_tiny,
    build_tiny,
    log_tail,
    stop_qemu,
    tun_open_to_users,
    wait_step,
)
from tests.netns import netns, nsrun

pytestmark = pytest.mark.root

MAC = "52:54:0a:2a:00:0a"
GUEST_IP = "10.42.0.10"
FQDN = "cp.qvm0.lan"
SEED_ADDR = "10.42.0.2"
SEED_URL = f"http://{SEED_ADDR}/"
TAP = "qvm0tap0"

# Generous for a loaded CI runner under TCG; a healthy boot reaches each
# step in a few seconds.
STEP_TIMEOUT = 60.0


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A lab-like CA and a server certificate for cp.qvm0.lan (EC P-256)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=qvm tiny-boot test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    # Same subject, other key: a CA that must not be trusted for the guest.
    openssl(
        "req", "-x509", *ec, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2",
        "-subj", "/CN=qvm tiny-boot test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        cwd=d,
    )  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "key.pem", "-out", "cp.csr", "-subj", f"/CN={FQDN}",
            cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:{FQDN}\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n"
    )
    openssl(
        "x509", "-req", "-in", "cp.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "cert.pem",
        cwd=d,
    )  # fmt: skip


def literal(text: str, indent: int) -> str:
    return textwrap.indent(text, " " * indent)


def user_data(pki: Path) -> str:
    """#cloud-config laid out as qvmd's metadata service (PyYAML) writes it.

    Besides the four /root/cert files it carries an entry outside /root/cert
    (the guest must not write it) and a literal block after write_files
    (ca_certs), so the guest's parser must find where write_files ends.
    """
    cert = (pki / "cert.pem").read_text()
    key = (pki / "key.pem").read_text()
    ca = (pki / "ca.pem").read_text()
    files = [
        ("cert.pem", cert, "0644"),
        ("key.pem", key, "0600"),
        ("fullchain.pem", cert + ca, "0644"),
        ("qvm-ca.pem", ca, "0644"),
    ]
    out = [
        "#cloud-config",
        "hostname: cp",
        f"fqdn: {FQDN}",
        "prefer_fqdn_over_hostname: true",
        "write_files:",
    ]
    for name, content, mode in files:
        out += [
            f"- path: /root/cert/{name}",
            "  owner: root:root",
            f"  permissions: '{mode}'",
            "  content: |",
            literal(content, 4).rstrip("\n"),
        ]
    out += [
        "- path: /etc/not-for-this-guest",
        "  content: |",
        "    outside /root/cert",
        "ca_certs:",
        "  trusted:",
        "  - |",
        literal(ca, 4).rstrip("\n"),
    ]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def background(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until(ok: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class TinyLab:
    ns: str
    tmp: Path
    pki: Path
    user: User
    image: TinyImage
    serial: Path
    share: Path | None  # the NFS export's directory on the host, if served

    def logs(self) -> str:
        parts = [f"--- {n}\n{log_tail(self.tmp / n)}" for n in ("dnsmasq.log", "http.log")]
        if self.share is not None:
            parts.append(f"--- ganesha\n{log_tail(self.tmp / 'ganesha.log')}")
        return "\n".join(parts)

    def curl_guest(self, ca: Path) -> subprocess.CompletedProcess[str]:
        """The user's command, from the host side of the lab."""
        return nsrun(
            self.ns, "curl", "-sS", "--max-time", "20", "--cacert", str(ca),
            "--resolve", f"{FQDN}:443:{GUEST_IP}", f"https://{FQDN}/",
            check=False, timeout=30,
        )  # fmt: skip


def start_ganesha(stack: contextlib.ExitStack, ns: str, tmp: Path) -> Path:
    """nfs-ganesha on 10.42.0.2, configured by qvmd's own builders (the
    lab's default export, seen by guests as /lab); returns the share."""
    state = tmp / "state"
    lab = default_lab(ns)
    paths = GaneshaPaths(state / "ganesha")
    exports = resolve_exports(default_exports(), PurePosixPath(state))
    write_ganesha_files(paths, build_ganesha_files(lab, exports, paths))
    (share,) = ensure_export_dirs(exports, state / "nfs")
    spec = ganesha_child(lab, paths)
    stack.enter_context(
        background(
            ["ip", "netns", "exec", ns, *spec.argv], tmp / "ganesha.log", dict(spec.env or {})
        )
    )

    def listening() -> bool:
        probe = f"import socket; socket.create_connection(('{SEED_ADDR}', 2049), 1).close()"
        return nsrun(ns, sys.executable, "-c", probe, check=False).returncode == 0

    wait_until(listening, "ganesha to listen on 2049")
    return share


@contextlib.contextmanager
def tiny_lab(user: User, image: TinyImage, nfs: bool) -> Iterator[TinyLab]:
    """The namespace, bridge, user-owned TAP, dnsmasq, seed server (and
    ganesha): everything a guest needs, all removed on the way out."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvm-tiny-")))
        ns = stack.enter_context(netns("tiny"))
        stack.enter_context(tun_open_to_users())
        pki = tmp / "pki"
        seed = tmp / "seed"
        pki.mkdir()
        seed.mkdir()
        make_pki(pki)
        (seed / "meta-data").write_text("instance-id: qvm-cp.qvm0.lan\nlocal-hostname: cp\n")
        (seed / "user-data").write_text(user_data(pki))

        nsrun(ns, "ip", "link", "add", "qvm0", "type", "bridge")
        nsrun(ns, "ip", "addr", "add", "10.42.0.1/24", "dev", "qvm0")
        nsrun(ns, "ip", "addr", "add", f"{SEED_ADDR}/24", "dev", "qvm0")
        nsrun(ns, "ip", "link", "set", "qvm0", "up")
        # A persistent TAP owned by the user, as qvmd (or tap-up.sh) makes it.
        nsrun(ns, "ip", "tuntap", "add", "dev", TAP, "mode", "tap", "user", str(user.uid),
              "vnet_hdr")  # fmt: skip
        # Deleted explicitly, not left to the namespace's removal.
        stack.callback(nsrun, ns, "ip", "link", "del", TAP, check=False)
        nsrun(ns, "ip", "link", "set", TAP, "master", "qvm0", "up")

        dnsmasq_cmd = [
            "ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
            "--conf-file=/dev/null", "--pid-file=", "--port=0", "--log-dhcp",
            "--interface=qvm0", "--bind-interfaces", "--except-interface=lo",
            "--dhcp-authoritative", "--domain=qvm0.lan",
            "--dhcp-range=10.42.0.10,static,255.255.255.0,1h",
            f"--dhcp-host={MAC},{GUEST_IP},cp",
            "--dhcp-option=option:router,10.42.0.1",
            f"--dhcp-leasefile={tmp / 'leases'}",
        ]  # fmt: skip
        http_cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "80",
            "--bind", SEED_ADDR, "--directory", str(seed),
        ]  # fmt: skip
        stack.enter_context(background(dnsmasq_cmd, tmp / "dnsmasq.log"))
        stack.enter_context(background(http_cmd, tmp / "http.log"))
        wait_until(
            lambda: nsrun(ns, "curl", "-fsS", "-o", "/dev/null", SEED_URL + "meta-data",
                          check=False).returncode == 0,
            "the seed server",
        )  # fmt: skip
        share = start_ganesha(stack, ns, tmp) if nfs else None
        yield TinyLab(ns, tmp, pki, user, image, tmp / "serial.log", share)


@contextlib.contextmanager
def running_guest(
    lab: TinyLab, steps: Sequence[str], append: Sequence[str] = (), skips: Sequence[str] = ()
) -> Iterator[dict[str, Step]]:
    """Boot the guest as the user, wait for each step in order (status ok,
    or skip for those in `skips`), print the timings, yield the steps; QEMU
    is stopped on the way out whatever happens."""
    t0 = time.monotonic()
    qemu = boot_tiny(
        lab.ns, TAP, MAC, lab.user.uid, lab.user.gid, SEED_URL, lab.serial, lab.image, append
    )
    try:
        seen: list[tuple[Step, float]] = []
        for name in steps:
            accept = ("skip",) if name in skips else ("ok",)
            s = wait_step(lab.serial, name, STEP_TIMEOUT, proc=qemu, accept=accept)
            seen.append((s, time.monotonic() - t0))
        print(f"\ntiny guest, kernel {lab.image.kernel_version}, QEMU as uid {lab.user.uid}")
        print(f"{'step':10} {'host s':>7} {'guest up':>9}  detail")
        for s, t in seen:
            print(f"{s.name:10} {t:7.2f} {s.guest_uptime:9.2f}  {s.detail[:100]}")
        yield {s.name: s for s, _ in seen}
    except TinyGuestError as e:
        pytest.fail(f"{e}\n{lab.logs()}")
    finally:
        stop_qemu(qemu)


@pytest.fixture(scope="module")
def image() -> TinyImage:
    t0 = time.monotonic()
    built = build_tiny()
    print(f"\nguests/tiny/build.sh: {time.monotonic() - t0:.1f}s (cache: {built.kernel.parent})")
    return built


def test_tiny_guest_boots_gets_lease_and_serves_https(
    bus_users: TestUsers, image: TinyImage
) -> None:
    with (
        tiny_lab(bus_users.member, image, nfs=False) as lab,
        running_guest(
            lab, ("dhcp", "seed", "hostname", "certs", "https", "nfs", "ready"), skips=("nfs",)
        ) as steps,
    ):
        assert steps["dhcp"].field("ip") == f"{GUEST_IP}/24", steps["dhcp"]
        assert steps["dhcp"].field("host") == "cp", steps["dhcp"]
        assert steps["dhcp"].field("router") == "10.42.0.1", steps["dhcp"]
        assert steps["seed"].field("from") == "smbios", steps["seed"]
        assert steps["hostname"].field("name") == FQDN, steps["hostname"]
        # Exactly the four /root/cert files, with their modes; not the entry
        # outside /root/cert.
        assert steps["certs"].field("files") == (
            "cert.pem:644,key.pem:600,fullchain.pem:644,qvm-ca.pem:644"
        ), steps["certs"]
        assert steps["https"].field("verified") == FQDN, steps["https"]
        # No NFS server here: the guest says so instead of hanging.
        assert "unreachable" in steps["nfs"].detail, steps["nfs"]

        # cloud-init's requests: both documents, from the guest's address.
        http_log = (lab.tmp / "http.log").read_text()
        for doc in ("meta-data", "user-data"):
            pattern = rf'^{re.escape(GUEST_IP)} .*"GET /{doc} HTTP/1\.1" 200 '
            assert re.search(pattern, http_log, re.M), (
                f"the seed server saw no GET /{doc} from {GUEST_IP}:\n{http_log}"
            )

        ok = lab.curl_guest(lab.pki / "ca.pem")
        assert ok.returncode == 0, f"curl with the lab CA failed: {ok.stderr}"
        assert "s_server" in ok.stdout, f"not openssl's -www page: {ok.stdout[:300]}"
        # With another CA (same name, other key) the same request must be
        # refused (60: peer certificate not trusted), or the check above
        # proves nothing.
        bad = lab.curl_guest(lab.pki / "other-ca.pem")
        assert bad.returncode == 60, f"curl with a foreign CA: rc={bad.returncode} {bad.stderr}"


def test_tiny_guest_mounts_the_lab_share_and_writes_to_it(
    bus_users: TestUsers, image: TinyImage
) -> None:
    with (
        tiny_lab(bus_users.member, image, nfs=True) as lab,
        running_guest(
            lab, ("dhcp", "seed", "hostname", "nfs", "ready"), append=("qvm.nfs_mark=1",)
        ) as steps,
    ):
        assert lab.share is not None
        assert steps["nfs"].detail.startswith(f"{SEED_ADDR}:/lab on /mnt vers=4."), steps["nfs"]
        assert steps["nfs"].field("wrote") == f"/mnt/qvm-{FQDN}", steps["nfs"]
        # What the guest wrote over NFS is on the host's side of the share.
        mark = lab.share / f"qvm-{FQDN}"
        assert mark.is_file(), f"{mark} missing; share holds {sorted(lab.share.iterdir())}"
        assert mark.read_text().startswith(f"{FQDN} "), mark.read_text()
