"""nfs-ganesha for the lab, for real: namespaces, a bridge, a userspace NFS client.

Topology (all namespaces made here, removed at the end):

    guest ns "cp"   eth0 10.42.0.10/24 ─┐
    guest ns "wk-1" eth0 10.42.0.11/24 ─┼─ qvm0 10.42.0.1/24  in "host" ns ── out0 192.0.2.1
    svc ns veth0 10.42.0.2/24 ──────────┘    (forwarding on)                      │
                                                             "outside" ns eth0 192.0.2.77

ganesha runs in the services namespace under qvmd's supervisor, isolated
(private /run) as qvmd runs it. This machine has no kernel NFS client, so
the client is libnfs (`nfs-cp`, `nfs-cat`, `nfs-ls` from Debian's
libnfs-utils), speaking NFSv4 over TCP from inside the guest namespaces.
The outside namespace is routed to the lab through the host, so its
packets reach ganesha: what refuses it is ganesha's client list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import pytest

from qvmd.model import Lab, default_lab
from qvmd.services.conffiles import Change
from qvmd.services.ganesha import (
    GaneshaPaths,
    build_ganesha_files,
    ensure_export_dirs,
    ganesha_child,
    write_ganesha_files,
)
from qvmd.services.nfs_exports import Export, default_exports, resolve_exports
from qvmd.services.supervisor import Child, ChildState, command_in_netns, terminate_stale
from tests.loopthread import LoopThread
from tests.netns import netns, nsrun, run

pytestmark = pytest.mark.root

SERVER = "10.42.0.2"
OUTSIDE_IP = "192.0.2.77"
UNPRIVILEGED = 1000  # a uid/gid with no account: AUTH_SYS only carries numbers


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def url(path: str) -> str:
    return f"nfs://{SERVER}{path}?version=4"


@dataclass
class Env:
    host: str
    svc: str
    cp: str
    wk1: str
    outside: str
    lab: Lab
    state: Path
    paths: GaneshaPaths
    exports: tuple[Export, ...]
    child: Child
    loop: LoopThread
    work: Path

    @property
    def share(self) -> Path:
        return Path(self.exports[0].path)

    def nfs(
        self, ns: str, *cmd: str, uid: int | None = None, timeout: float = 15
    ) -> subprocess.CompletedProcess[str]:
        """A libnfs tool in namespace `ns`, as root or as `uid` (setpriv)."""
        prefix: tuple[str, ...] = ()
        if uid is not None:
            prefix = ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups")
        return nsrun(ns, *prefix, *cmd, check=False, timeout=timeout)

    def put(self, ns: str, path: str, data: str, uid: int | None = None) -> None:
        src = self.work / f"src-{uuid.uuid4().hex}"
        src.write_text(data)
        src.chmod(0o644)
        res = self.nfs(ns, "nfs-cp", str(src), url(path), uid=uid)
        assert res.returncode == 0, f"nfs-cp to {path} from {ns} failed: {res.stdout}{res.stderr}"

    def cat(self, ns: str, path: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        return self.nfs(ns, "nfs-cat", url(path), uid=uid)

    def pid(self) -> int | None:
        return self.child.status().pid


def ganesha_pids(marker: str) -> list[int]:
    """Every running ganesha.nfsd whose command line names `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"ganesha.nfsd") and any(marker.encode() in a for a in cmd):
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def plugged_ns(host: str, tag: str, address: str) -> Iterator[str]:
    """A namespace with eth0 = `address`/24 on the bridge."""
    with netns(tag) as ns:
        port = f"qvtn{os.getpid() % 10000}{tag}"
        nsrun(host, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
              "netns", ns)  # fmt: skip
        try:
            nsrun(host, "ip", "link", "set", port, "master", "qvm0", "up")
            nsrun(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            nsrun(ns, "ip", "link", "set", "eth0", "up")
            yield ns
        finally:
            run(["ip", "-n", host, "link", "del", port], check=False)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns("h"))
        svc = stack.enter_context(netns("s"))
        outside = stack.enter_context(netns("o"))

        nsrun(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nsrun(host, "ip", "link", "add", "qvm0", "type", "bridge")
        nsrun(host, "ip", "addr", "add", "10.42.0.1/24", "dev", "qvm0")
        nsrun(host, "ip", "link", "set", "qvm0", "up")
        nsrun(host, "ip", "link", "add", "qvm0-svc", "type", "veth", "peer", "name", "veth0",
              "netns", svc)  # fmt: skip
        nsrun(host, "ip", "link", "set", "qvm0-svc", "master", "qvm0", "up")
        nsrun(svc, "ip", "addr", "add", f"{SERVER}/24", "dev", "veth0")
        nsrun(svc, "ip", "link", "set", "veth0", "up")
        nsrun(svc, "ip", "route", "add", "default", "via", "10.42.0.1")
        nsrun(host, "ip", "link", "add", "out0", "type", "veth", "peer", "name", "eth0",
              "netns", outside)  # fmt: skip
        nsrun(host, "ip", "addr", "add", "192.0.2.1/24", "dev", "out0")
        nsrun(host, "ip", "link", "set", "out0", "up")
        nsrun(outside, "ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        nsrun(outside, "ip", "link", "set", "eth0", "up")
        nsrun(outside, "ip", "route", "add", "default", "via", "192.0.2.1")
        cp = stack.enter_context(plugged_ns(host, "c", "10.42.0.10"))
        wk1 = stack.enter_context(plugged_ns(host, "w", "10.42.0.11"))

        top = Path(tempfile.mkdtemp(prefix="qvt-ganesha-"))
        stack.callback(shutil.rmtree, top, True)
        state = top / "state"
        work = top / "work"
        work.mkdir()
        # setpriv'd clients read their source files from here.
        top.chmod(0o755)
        work.chmod(0o755)

        lab = default_lab(svc)
        paths = GaneshaPaths(state / "ganesha")
        exports = resolve_exports(default_exports(), PurePosixPath(state))
        files = build_ganesha_files(lab, exports, paths)
        assert write_ganesha_files(paths, files) is Change.RESTART
        assert ensure_export_dirs(exports, state / "nfs") == [state / "nfs" / "lab"]

        loop = LoopThread()
        stack.callback(loop.close)
        # Whatever happens, no ganesha of ours outlives the test.
        stack.callback(_kill_leftovers, str(paths.conf))
        child = Child(replace(ganesha_child(lab, paths), backoff_initial=0.1))

        async def start() -> None:
            child.start()
            await child.wait_running(10)

        loop.call(start())
        stack.callback(lambda: loop.call(child.stop()))

        e = Env(host, svc, cp, wk1, outside, lab, state, paths, exports, child, loop, work)
        # ganesha has no readiness signal; it serves once a client gets an answer.
        took = wait_for(
            lambda: e.nfs(cp, "nfs-ls", url("/lab")).returncode == 0, 20, "ganesha to serve"
        )
        print(f"\nganesha served {took:.2f}s after its start")
        yield e


def _kill_leftovers(marker: str) -> None:
    for pid in ganesha_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def test_listens_only_on_the_services_address_tcp_2049(env: Env) -> None:
    res = nsrun(env.svc, "ss", "-H", "-lntu")
    sockets = sorted(" ".join(line.split()[i] for i in (0, 4)) for line in res.stdout.splitlines())
    assert sockets == [f"tcp [::ffff:{SERVER}]:2049"], res.stdout


def test_one_guest_writes_another_reads(env: Env) -> None:
    data = f"written by cp {uuid.uuid4()}\n"
    env.put(env.cp, "/lab/from-cp.txt", data, uid=UNPRIVILEGED)
    res = env.cat(env.wk1, "/lab/from-cp.txt", uid=UNPRIVILEGED)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    # libnfs creates files 0660: root on wk-1, squashed to nobody, may not read it.
    assert env.cat(env.wk1, "/lab/from-cp.txt").returncode != 0
    on_disk = env.share / "from-cp.txt"
    assert on_disk.read_text() == data
    assert (on_disk.stat().st_uid, on_disk.stat().st_gid) == (UNPRIVILEGED, UNPRIVILEGED)
    listing = env.nfs(env.wk1, "nfs-ls", url("/lab"))
    assert "from-cp.txt" in listing.stdout


def test_root_on_a_guest_is_squashed_to_nobody(env: Env) -> None:
    env.put(env.cp, "/lab/from-root.txt", "root wrote this\n")  # libnfs as uid 0
    st = (env.share / "from-root.txt").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534), "root_squash should map uid 0 to 65534"
    # And root cannot use root's rights on the share: a root-owned 0600 file
    # placed on the server stays unreadable to the guest's root.
    secret = env.share / "root-only.txt"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    res = env.cat(env.cp, "/lab/root-only.txt")
    assert res.returncode != 0 and "secret" not in res.stdout, res.stdout


def test_a_client_outside_the_lab_subnet_is_refused(env: Env) -> None:
    (env.share / "visible.txt").write_text("lab only\n")
    # The network lets it through (so the refusal below is ganesha's)...
    probe = nsrun(
        env.outside, "python3", "-c",
        f"import socket; socket.create_connection(('{SERVER}', 2049), 3).close()",
        check=False,
    )  # fmt: skip
    assert probe.returncode == 0, f"outside cannot even connect: {probe.stderr}"
    # ...and ganesha answers it with an error, for the share and the root.
    for path in ("/lab/visible.txt", "/lab", "/"):
        tool = "nfs-cat" if path.endswith(".txt") else "nfs-ls"
        res = env.nfs(env.outside, tool, url(path))
        assert res.returncode != 0, f"{tool} {path} from {OUTSIDE_IP} succeeded: {res.stdout}"
        assert "lab only" not in res.stdout and "visible" not in res.stdout
        # Refused by ganesha's client list, not lost on the way.
        assert "NFS4ERR_ACCESS" in res.stderr, res.stderr
        print(f"\noutside {tool} {path}: {res.stderr.strip().splitlines()[0]}")
    # The same file from inside the lab, to show it was there to be refused.
    assert env.cat(env.wk1, "/lab/visible.txt").stdout == "lab only\n"


def test_ganesha_cannot_see_the_hosts_run_or_system_bus(env: Env) -> None:
    pid = env.pid()
    assert pid is not None
    assert Path(f"/proc/{pid}/exe").resolve().name == "ganesha.nfsd"
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    run_mounts = [m.split() for m in mounts if m.split()[4] == "/run"]
    assert run_mounts and run_mounts[-1][-3] == "tmpfs", run_mounts
    root = Path(f"/proc/{pid}/root")
    assert not (root / "run/dbus/system_bus_socket").exists()
    assert not (root / "run/rpcbind.sock").exists()
    environ = dict(
        kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv
    )
    assert environ["DBUS_SYSTEM_BUS_ADDRESS"] == f"unix:path={env.paths.no_bus}"
    assert not env.paths.no_bus.exists()
    # ganesha's own files are where we put them, not under /var/lib/nfs.
    assert any(env.paths.recovery.iterdir()), "no recovery data under the state dir"
    assert int(env.paths.pid.read_text().split()[0]) == pid


def test_an_export_added_by_sighup_is_served_without_restart(env: Env) -> None:
    pid = env.pid()
    extra = Export(2, "tools", PurePosixPath("tools"), PurePosixPath("/tools"), access="ro")
    exports = resolve_exports((*env.exports, extra), PurePosixPath(env.state))
    ensure_export_dirs(exports, env.state / "nfs")
    (env.state / "nfs" / "tools" / "tool.txt").write_text("a tool\n")
    files = build_ganesha_files(env.lab, exports, env.paths)
    assert write_ganesha_files(env.paths, files) is Change.RELOAD

    async def hup() -> bool:
        return env.child.reload()

    assert env.loop.call(hup())
    wait_for(lambda: env.cat(env.wk1, "/tools/tool.txt").stdout == "a tool\n", 10,
             "the new export to serve")  # fmt: skip
    assert env.pid() == pid, "a SIGHUP must not restart ganesha"
    res = env.nfs(env.wk1, "nfs-cp", "/etc/hostname", url("/tools/new.txt"))
    assert res.returncode != 0, "the read-only export accepted a write"
    # The first share is still there and still read-write.
    env.put(env.cp, "/lab/after-reload.txt", "still rw\n", uid=UNPRIVILEGED)


def test_kill_9_is_restarted_and_serves_again(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qvmd.child.ganesha")
    before = env.child.status()
    assert before.state is ChildState.RUNNING and before.pid is not None
    env.put(env.cp, "/lab/before-crash.txt", "survives\n", uid=UNPRIVILEGED)

    t0 = time.monotonic()
    os.kill(before.pid, 9)
    wait_for(lambda: env.pid() not in (None, before.pid), 10, "a new ganesha")
    respawned = time.monotonic() - t0
    wait_for(
        lambda: env.cat(env.wk1, "/lab/before-crash.txt", UNPRIVILEGED).stdout == "survives\n",
        20,
        "the restarted ganesha to serve",
    )
    serving = time.monotonic() - t0
    print(f"\nkill -9 of ganesha: respawned after {respawned:.2f}s, serving after {serving:.2f}s")

    after = env.child.status()
    assert after.restarts == before.restarts + 1
    assert after.last_exit == "killed by signal 9 (SIGKILL)"
    # Graceless: new opens work at once, no 90 s grace period.
    env.put(env.wk1, "/lab/after-crash.txt", "new\n", uid=UNPRIVILEGED)
    assert serving < 10, f"serving again took {serving:.1f}s"
    assert ganesha_pids(str(env.paths.conf)) == [after.pid]
    # ganesha's own log lines reach qvmd's log, tagged with the new pid.
    started = [
        r for r in caplog.records
        if r.name == "qvmd.child.ganesha" and "NFS SERVER INITIALIZED" in r.getMessage()
    ]  # fmt: skip
    assert started and getattr(started[-1], "QVM_CHILD_PID", None) == after.pid


def test_a_stale_ganesha_is_ended_before_ours_starts(env: Env) -> None:
    """A qvmd killed without stopping its children leaves ganesha holding
    10.42.0.2:2049; the next qvmd ends it through the pid file (trusted only
    with our conf path in its command line) before starting its own."""
    env.loop.call(env.child.stop())
    spec = env.child.spec
    stale = subprocess.Popen(
        command_in_netns(spec.argv, spec.netns),
        env=dict(spec.env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                env.paths.pid.exists() and env.paths.pid.read_text().split()[:1] == [str(stale.pid)]
            ),
            10,
            "the stale ganesha's pid file",
        )
        wait_for(lambda: env.nfs(env.cp, "nfs-ls", url("/lab")).returncode == 0, 10,
                 "the stale ganesha to serve")  # fmt: skip
        assert terminate_stale(env.paths.pid, "/not/our/ganesha.conf") is None
        assert stale.poll() is None, "a pid whose command line lacks the marker was ended"
        assert terminate_stale(env.paths.pid, str(env.paths.conf)) == stale.pid
        assert stale.wait(5) == 0, "ganesha should end cleanly on SIGTERM"
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()

    async def start() -> None:
        env.child.start()
        await env.child.wait_running(10)

    env.loop.call(start())
    wait_for(lambda: env.nfs(env.cp, "nfs-ls", url("/lab")).returncode == 0, 10,
             "our ganesha to serve after the stale one")  # fmt: skip
    assert ganesha_pids(str(env.paths.conf)) == [env.pid()]


def test_stop_leaves_no_ganesha(env: Env) -> None:
    # Runs last in this module (pytest keeps file order): stop, and nothing is left.
    env.loop.call(env.child.stop())
    assert env.child.status().state is ChildState.STOPPED
    assert ganesha_pids(str(env.paths.conf)) == []
    assert env.nfs(env.cp, "nfs-ls", url("/lab"), timeout=20).returncode != 0


# --- why ganesha runs with a private /run -------------------------------------

# Runs inside `unshare --mount` (a private mount namespace of its own, so the
# tmpfs on /run below is invisible to the host). It plays a host whose
# rpcbind is running (Debian's nfs-ganesha package depends on rpcbind, so
# such hosts are common): rpcbind gets a network namespace of its own and
# its socket in the private /run. ganesha then runs in another network
# namespace twice, plain and isolated, and we ask rpcbind what it was told.
RPCBIND_PROBE = r"""
import json, os, subprocess, sys, time
ganesha_ns, rpcbind_ns, work, plain_argv, isolated_argv, env_json = sys.argv[1:7]
env = json.loads(env_json)
# /run/netns disappears under the tmpfs: keep both namespaces reachable.
saved, rpc_net = os.path.join(work, "netns-ganesha"), os.path.join(work, "netns-rpcbind")
for src, dst in ((ganesha_ns, saved), (rpcbind_ns, rpc_net)):
    open(dst, "w").close()
    subprocess.run(["mount", "--bind", src, dst], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
rpcbind = subprocess.Popen(["nsenter", f"--net={rpc_net}", "--", "rpcbind", "-f", "-w"])
try:
    deadline = time.monotonic() + 5
    while not os.path.exists("/run/rpcbind.sock"):
        assert time.monotonic() < deadline, "rpcbind did not start"
        time.sleep(0.02)
    time.sleep(0.2)
    result = {}
    for mode, argv in (("plain", plain_argv), ("isolated", isolated_argv)):
        cmd = ["nsenter", f"--net={saved}", "--", *json.loads(argv)]
        g = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                ss = subprocess.run(["nsenter", f"--net={saved}", "--", "ss", "-H", "-lnt"],
                                    capture_output=True, text=True).stdout
                if ":2049" in ss:
                    break
                assert time.monotonic() < deadline, f"{mode} ganesha did not listen"
                time.sleep(0.05)
            # Registration happens before the listener is served; give it a moment.
            time.sleep(0.3)
            out = subprocess.run(["nsenter", f"--net={rpc_net}", "--",
                                  "rpcinfo", "-p", "127.0.0.1"],
                                 capture_output=True, text=True, check=True).stdout
            result[mode] = [l.split() for l in out.splitlines() if l.split()[:1] == ["100003"]]
        finally:
            g.terminate()
            try:
                g.wait(15)
            except subprocess.TimeoutExpired:
                g.kill()
                g.wait()
    print(json.dumps(result))
finally:
    rpcbind.kill()
    rpcbind.wait()
"""


def test_isolation_keeps_ganesha_away_from_the_hosts_rpcbind(env: Env, tmp_path: Path) -> None:
    """Without its private /run, ganesha in the services namespace registers
    NFS with the *host's* rpcbind through /run/rpcbind.sock (and would have
    unregistered the host's own NFS server first). Isolated, it cannot."""
    if shutil.which("rpcbind") is None or shutil.which("rpcinfo") is None:
        pytest.skip("rpcbind/rpcinfo not installed")
    with netns("r") as ns, netns("b") as rpcbind_ns:
        # No dummy driver on these machines: a veth pair inside the namespace.
        nsrun(ns, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        nsrun(ns, "ip", "addr", "add", f"{SERVER}/24", "dev", "d0")
        nsrun(ns, "ip", "link", "set", "d0", "up")
        nsrun(ns, "ip", "link", "set", "d1", "up")
        paths = GaneshaPaths(tmp_path / "ganesha")
        exports = resolve_exports(default_exports(), PurePosixPath(tmp_path))
        write_ganesha_files(paths, build_ganesha_files(env.lab, exports, paths))
        ensure_export_dirs(exports, tmp_path / "nfs")
        plain = ganesha_child(env.lab, paths, isolate=False)
        isolated = ganesha_child(env.lab, paths)
        assert plain.env is not None
        res = run(
            [
                "unshare", "--mount", "--", sys.executable, "-c", RPCBIND_PROBE,
                f"/run/netns/{ns}", f"/run/netns/{rpcbind_ns}", str(tmp_path),
                json.dumps(plain.argv), json.dumps(isolated.argv), json.dumps(dict(plain.env)),
            ],
            check=False,
            timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nrpcbind saw from plain ganesha: {result['plain']}, isolated: {result['isolated']}")
    assert result["plain"], "plain ganesha did not reach rpcbind: the test proves nothing"
    assert result["isolated"] == []
    assert ganesha_pids(str(paths.conf)) == []
