"""Bus-contract test environment: private system bus, real polkitd, real users.

Everything here is real and everything is undone, even on failure:

- `private_system_bus()` runs a `dbus-daemon` configured like the system bus
  (type system, EXTERNAL auth, deny-by-default policy) on a socket in a temp
  dir, with the project's own `data/dbus/org.qvm.Net.conf` and polkit's bus
  policy included.  The machine's real system bus is never used: every
  client gets the private address through DBUS_SYSTEM_BUS_ADDRESS.
- `polkitd_on(address)` installs the project's polkit action and rules files
  where polkitd reads them and runs the real `polkitd` on that bus.
- `test_users()` creates a member of group `qvm` and an outsider.
- `run_as()` / `spawn_as()` run a command as one of those users.

Host-global changes (files under /usr/share/polkit-1 and /etc/polkit-1, group
`qvm`) are shared between concurrent test runs through a small registry under
a lock: the first user installs, the last one out removes, and a file or group
that existed before any test run is never modified or removed.  Per-run
objects (users, processes, temp dirs) carry the pid in their name, so parallel
runs do not collide, and leftovers of a killed run are swept on the next start.

Plain functions and context managers, no pytest imports: conftest.py wraps
them in fixtures.
"""

from __future__ import annotations

import fcntl
import grp
import itertools
import json
import os
import pwd
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvmd.fsutil import pid_alive

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
OUR_BUS_POLICY = DATA / "dbus" / "org.qvm.Net.conf"
OUR_POLKIT_POLICY = DATA / "polkit" / "org.qvm.Net.policy"
OUR_POLKIT_RULES = DATA / "polkit" / "50-org.qvm.Net.rules"
POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
POLKIT_NAME = "org.freedesktop.PolicyKit1"

QVM_GROUP = "qvm"
USER_PREFIX = "qvmt-"

# Registry of host-global setup shared by concurrent runs (see module doc).
# The lock is an flock on an always-present directory, so no lock file is
# ever left behind; the state file exists only while someone holds a share.
_LOCK_PATH = Path("/run")
_STATE_PATH = Path("/run/qvmd-tests-shared.json")

START_TIMEOUT = 10.0

# A system-bus-like configuration: the default policy of
# /usr/share/dbus-1/system.conf (deny own, deny method calls, allow replies
# and signals, allow talking to the bus), without forking, pid file, syslog,
# setuid helper or activation.
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{includes}
</busconfig>
"""


class HarnessError(RuntimeError):
    """The test environment could not be set up (not a product failure)."""


# --------------------------------------------------------------------------
# shared registry


@contextmanager
def _locked_state() -> Iterator[dict[str, Any]]:
    fd = os.open(_LOCK_PATH, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state: dict[str, Any] = {}
        if _STATE_PATH.exists():
            state = json.loads(_STATE_PATH.read_text())
        yield state
        if state:
            tmp = _STATE_PATH.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(_STATE_PATH)
        else:
            _STATE_PATH.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


@contextmanager
def _shared(
    key: str,
    acquire: Callable[[list[str]], list[str]],
    release: Callable[[list[str]], None],
) -> Iterator[None]:
    """Hold a share of host-global setup `key`.

    `acquire(previous_undo)` runs when nobody alive holds a share; it gets
    the undo list of a crashed previous holder (so it can recognise its own
    leftovers) and returns the new undo list.  `release(undo)` runs when the
    last holder leaves.
    """
    me = os.getpid()
    with _locked_state() as state:
        entry = state.setdefault(key, {"pids": [], "undo": []})
        entry["pids"] = [p for p in entry["pids"] if pid_alive(p)]
        if not entry["pids"]:
            try:
                entry["undo"] = acquire(list(entry["undo"]))
            except BaseException:
                if not entry["undo"]:
                    del state[key]
                raise
        entry["pids"].append(me)
    try:
        yield
    finally:
        with _locked_state() as state:
            entry = state.get(key)
            if entry is not None:
                if me in entry["pids"]:
                    entry["pids"].remove(me)
                entry["pids"] = [p for p in entry["pids"] if pid_alive(p)]
                if not entry["pids"]:
                    release(list(entry["undo"]))
                    del state[key]


def shared_holders(key: str) -> list[int]:
    """Live pids holding a share of `key` ("polkit-files", "group-qvm")."""
    with _locked_state() as state:
        entry = state.get(key)
        return [p for p in entry["pids"] if pid_alive(p)] if entry else []


def shared_undo(key: str) -> list[str]:
    """What the harness itself installed for `key` (possibly by a crashed run)."""
    with _locked_state() as state:
        entry = state.get(key)
        return list(entry["undo"]) if entry else []


# --------------------------------------------------------------------------
# processes


def _stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """First line of proc's stdout, without blocking past `timeout`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HarnessError(f"{proc.args!r}: no output line within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise HarnessError(f"{proc.args!r}: exited (rc={proc.wait()}) before printing")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def clean_env(bus_address: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment that points D-Bus clients at the private bus only."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/",
        "DBUS_SYSTEM_BUS_ADDRESS": bus_address,
        # Anything that falls back to the session bus must fail, not find one.
        "DBUS_SESSION_BUS_ADDRESS": "disabled:",
    }
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------
# private system bus


@contextmanager
def private_system_bus(
    policy_files: Sequence[Path] = (OUR_BUS_POLICY, POLKIT_BUS_POLICY),
) -> Iterator[str]:
    """Run a system-bus-like dbus-daemon; yield its address.

    `policy_files` are copied into the bus's temp dir and included (by
    default the project's org.qvm.Net.conf and polkit's own policy, as on a
    real host).  A policy file dbus-daemon rejects makes this raise
    HarnessError.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"qvmt-bus-{os.getpid()}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Unprivileged test users and polkitd (which drops to user polkitd)
        # must reach the socket.
        tmp.chmod(0o755)
        includedir = tmp / "system.d"
        includedir.mkdir()
        for f in policy_files:
            shutil.copyfile(f, includedir / f.name)
        config = tmp / "bus.conf"
        # One <include> per file rather than <includedir>: dbus-daemon skips
        # a broken file in an includedir with only a log line, while a broken
        # <include> stops it, so a bus that starts proves our policy parses.
        includes = "\n".join(
            f"  <include>{includedir / f.name}</include>" for f in sorted(policy_files)
        )
        config.write_text(_BUS_CONFIG.format(socket=tmp / "system_bus_socket", includes=includes))
        log = (tmp / "dbus-daemon.log").open("wb")
        try:
            proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=clean_env("disabled:"),
            )
        finally:
            log.close()
        try:
            address = _read_line(proc, START_TIMEOUT)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{(tmp / 'dbus-daemon.log').read_text()}") from None
        if not address.startswith("unix:path="):
            raise HarnessError(f"dbus-daemon printed {address!r}")
        yield address
    finally:
        if proc is not None:
            _stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def name_has_owner(bus_address: str, name: str) -> bool:
    """Ask the private bus whether `name` is owned (busctl, no event loop needed)."""
    out = subprocess.run(
        [
            "busctl",
            f"--address={bus_address}",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
        env=clean_env(bus_address),
    ).stdout.strip()
    return out == "b true"


def wait_for_name(
    bus_address: str,
    name: str,
    timeout: float = START_TIMEOUT,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not name_has_owner(bus_address, name):
        if not alive():
            raise HarnessError(f"the owner-to-be of {name} exited")
        if time.monotonic() > deadline:
            raise HarnessError(f"{name} not owned within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# --------------------------------------------------------------------------
# polkit files and polkitd


def _install_files(pairs: Sequence[tuple[Path, Path]]) -> Callable[[list[str]], list[str]]:
    def acquire(previous: list[str]) -> list[str]:
        undo: list[str] = []
        try:
            for src, dst in pairs:
                if dst.exists() and str(dst) not in previous:
                    # Installed by someone else (a real package, an admin):
                    # use it only if it is ours, byte for byte; never touch it.
                    if dst.read_bytes() != src.read_bytes():
                        raise HarnessError(
                            f"{dst} exists and differs from {src}; "
                            "remove or update it before running the bus tests"
                        )
                    continue
                tmp = dst.with_name(f".{dst.name}.qvmt-{os.getpid()}")
                shutil.copyfile(src, tmp)
                tmp.chmod(0o644)
                tmp.replace(dst)
                undo.append(str(dst))
        except BaseException:
            _remove_files(undo)
            raise
        return undo

    return acquire


def _remove_files(paths: list[str]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


@contextmanager
def polkit_files_installed() -> Iterator[None]:
    """Our .policy in /usr/share/polkit-1/actions and .rules in /etc/polkit-1/rules.d."""
    pairs = [
        (OUR_POLKIT_POLICY, POLKIT_ACTIONS_DIR / OUR_POLKIT_POLICY.name),
        (OUR_POLKIT_RULES, POLKIT_RULES_DIR / OUR_POLKIT_RULES.name),
    ]
    with _shared("polkit-files", _install_files(pairs), _remove_files):
        yield


@dataclass
class Polkitd:
    pid: int
    log_path: Path
    _proc: subprocess.Popen[bytes] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        """Log lines that report errors or warnings (rules that failed, ...)."""
        return [
            line
            for line in self.log().splitlines()
            if re.search(r"\b(Error|error|WARNING|CRITICAL)\b", line)
        ]

    def alive(self) -> bool:
        return self._proc.poll() is None


@contextmanager
def polkitd_on(bus_address: str, debug: bool = True) -> Iterator[Polkitd]:
    """Install our polkit files and run the real polkitd on the private bus.

    polkitd drops to user `polkitd` itself, as on a real host, so the shipped
    bus policy of polkit (only user polkitd may own its name) is exercised.
    Yields once org.freedesktop.PolicyKit1 is owned.

    debug=True (default) runs without --no-debug: errors raised by rules at
    check time ("Error evaluating admin rules: TypeError ...") are only
    printed in debug mode (otherwise they go to syslog, absent in CI), and
    tests check `Polkitd.errors()` after their checks.
    """
    with polkit_files_installed():
        tmp = Path(tempfile.mkdtemp(prefix=f"qvmt-polkitd-{os.getpid()}-"))
        proc: subprocess.Popen[bytes] | None = None
        try:
            log_path = tmp / "polkitd.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [str(POLKITD)] if debug else [str(POLKITD), "--no-debug"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=clean_env(bus_address),
                    cwd="/",
                )
            p = proc
            try:
                wait_for_name(bus_address, POLKIT_NAME, alive=lambda: p.poll() is None)
            except HarnessError as e:
                raise HarnessError(f"polkitd: {e}\n{log_path.read_text()}") from None
            yield Polkitd(proc.pid, log_path, proc)
        finally:
            if proc is not None:
                _stop(proc)
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# users


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class TestUsers:
    __test__ = False  # not a pytest test class

    member: User  # in group qvm
    outsider: User  # not in group qvm
    qvm_gid: int


def _run(cmd: Sequence[str]) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)}: rc={r.returncode}: {r.stderr.strip()}")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _acquire_qvm_group(previous: list[str]) -> list[str]:
    if _group_exists(QVM_GROUP):
        # Ours if a crashed run recorded it; otherwise it belongs to the host.
        return previous if "created" in previous else []
    _run(["groupadd", "--system", QVM_GROUP])
    return ["created"]


def _release_qvm_group(undo: list[str]) -> None:
    if "created" in undo and _group_exists(QVM_GROUP):
        _run(["groupdel", QVM_GROUP])


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _delete_user(name: str) -> None:
    if _user_exists(name):
        # userdel also removes the user's own group (USERGROUPS_ENAB).
        _run(["userdel", name])
    if _group_exists(name):
        _run(["groupdel", name])


_TEST_USER_RE = re.compile(rf"^{re.escape(USER_PREFIX)}(?:member|outsider)-(\d+)-\d+$")


def sweep_stale_users() -> list[str]:
    """Delete test users left by runs whose process is gone; return their names."""
    swept = []
    for entry in pwd.getpwall():
        m = _TEST_USER_RE.match(entry.pw_name)
        if m and not pid_alive(int(m.group(1))):
            _delete_user(entry.pw_name)
            swept.append(entry.pw_name)
    return swept


def _make_user(name: str, groups: Sequence[str]) -> User:
    cmd = [
        "useradd",
        "--system",
        "--no-create-home",
        "--user-group",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
    ]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    _run([*cmd, name])
    pw = pwd.getpwnam(name)
    gids = tuple(sorted(os.getgrouplist(name, pw.pw_gid)))
    return User(name, pw.pw_uid, pw.pw_gid, gids)


_user_sets = itertools.count()


@contextmanager
def test_users() -> Iterator[TestUsers]:
    """Group qvm (shared, created if missing) and two fresh system users.

    Names carry the pid and a counter: qvmt-member-<pid>-<n> (in qvm),
    qvmt-outsider-<pid>-<n>, so several fixtures of one run can coexist.
    """
    sweep_stale_users()
    tag = f"{os.getpid()}-{next(_user_sets)}"
    names = [f"{USER_PREFIX}member-{tag}", f"{USER_PREFIX}outsider-{tag}"]
    with _shared("group-qvm", _acquire_qvm_group, _release_qvm_group):
        made: list[str] = []
        try:
            made.append(names[0])
            member = _make_user(names[0], [QVM_GROUP])
            made.append(names[1])
            outsider = _make_user(names[1], [])
            qvm_gid = grp.getgrnam(QVM_GROUP).gr_gid
            if qvm_gid not in member.groups or qvm_gid in outsider.groups:
                raise HarnessError("group membership of the test users is not as created")
            yield TestUsers(member, outsider, qvm_gid)
        finally:
            for name in reversed(made):
                _delete_user(name)


test_users.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


# --------------------------------------------------------------------------
# running as a user


def as_user_argv(user: User, cmd: Sequence[str]) -> list[str]:
    """argv that runs `cmd` with the user's uid, gid and supplementary groups.

    setpriv changes all uids, so the kernel drops every capability; no
    new privileges can be regained through setuid binaries either.
    """
    return [
        "setpriv",
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--init-groups",
        "--no-new-privs",
        "--",
        *cmd,
    ]


def run_as(
    user: User,
    cmd: Sequence[str],
    bus_address: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` as `user` with DBUS_SYSTEM_BUS_ADDRESS=bus_address; capture output."""
    return subprocess.run(
        as_user_argv(user, cmd),
        env=clean_env(bus_address, env),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )


def spawn_as(
    user: User | None,
    cmd: Sequence[str],
    bus_address: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` as `user` (None = as root) with pipes on stdin/stdout.

    The caller must stop it (see `stop_process`).
    """
    argv = list(cmd) if user is None else as_user_argv(user, cmd)
    return subprocess.Popen(
        argv,
        env=clean_env(bus_address, env),
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    _stop(proc, timeout)


def first_line(proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> str:
    """The first line `proc` prints on stdout (e.g. a client's unique bus name)."""
    return _read_line(proc, timeout)
