"""1. A TAP for an unprivileged user, and 2. the same at scale (+ daemon RSS).

Each create is timed until the TAP exists, owned by the user, enslaved to
qvm0 and up, i.e. until QEMU could open it. The TAP is deleted between
samples *outside* the timing (the kernel takes ~16 ms to delete a TAP).
Samples of the product and of its baselines are interleaved, so a noisy
moment hits all of them alike.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.env import (
    NS_PROBE,
    PYTHON,
    ROOT,
    Budget,
    BusClient,
    LabEnv,
    busenv,
    links,
    nsrun,
    rss_mb,
    timed_run,
    wait_idle,
)
from bench.report import Results, Row

QVMCTL = [PYTHON, "-m", "qvmd.cli"]
TAP_CLIENT = str(ROOT / "tests" / "helpers" / "tap_client.py")
BRIDGE_HELPER = Path("/usr/lib/qemu/qemu-bridge-helper")
BRIDGE_CONF = Path("/etc/qemu/bridge.conf")
USER_TAP = "qvm0tap100"  # a dynamic TAP: not one of the lab's guests
BASELINE_TAP = "qvmbench0"  # outside qvmd's prefix: qvmd leaves it alone

S1 = "1 TAP for a user"
S2 = "2 scale"

IP_N = "root `ip -n NS tuntap add … user U` + `ip -n NS link set … master qvm0 up`"
IP_EXEC = "root `ip netns exec NS ip tuntap add …` + `ip netns exec NS ip link set …`"
HELPER = "root qemu-bridge-helper (new TAP on qvm0, fd passed back)"
QVMCTL_CREATE = "`qvmctl tap create` as a qvm-group user (process start included)"
QVMCTL_CREATE_2 = "`qvmctl tap create` (same samples) vs the `ip netns exec` baseline"
QVMCTL_CREATE_3 = "`qvmctl tap create` (same samples) vs qemu-bridge-helper"
DBUS_MEMBER = "CreateTap over D-Bus, long-lived client, qvm-group user (polkit)"
DBUS_MEMBER_TIGHT = "CreateTap over D-Bus, qvm-group user, tight create/delete loop"
DBUS_ROOT = "CreateTap over D-Bus, long-lived client, root (no polkit check)"
POLKIT = "polkit CheckAuthorization alone, qvm-group user (in every guarded call)"


def _ratio_within(limit: float) -> Callable[[Row, Row | None], bool]:
    def check(row: Row, base: Row | None) -> bool:
        return base is not None and row.median <= limit * base.median

    return check


def _check_tap_ready(lab: LabEnv, name: str, uid: int) -> str:
    """'' if `name` is as QEMU needs it (owner, on qvm0, up) and uid can attach; else why."""
    link = links(lab.netns).get(name)
    if link is None:
        return f"{name} missing"
    owner = link.get("linkinfo", {}).get("info_data", {}).get("user")
    if link.get("master") != "qvm0" or "UP" not in link.get("flags", []):
        return f"{name} not up on qvm0: {link.get('master')} {link.get('flags')}"
    user = lab.users.member
    if owner not in (user.name, str(uid)):
        return f"{name} owner is {owner}, not {uid}"
    proc = subprocess.run(
        [PYTHON, TAP_CLIENT, lab.netns, name, str(uid), str(user.gid)],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.stdout.strip() != "attached":
        return f"QEMU-style open of {name} as uid {uid}: {proc.stdout.strip()} {proc.stderr[-300:]}"
    return ""


def _qvmctl_create(lab: LabEnv, name: str) -> float:
    argv = busenv.as_user_argv(lab.users.member, [*QVMCTL, "tap", "create", name])
    ms, proc = timed_run(argv, env=busenv.clean_env(lab.bus), cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"qvmctl tap create {name}: rc={proc.returncode}: {proc.stderr}")
    return ms


def _ip_create(lab: LabEnv, via_exec: bool) -> float:
    uid = str(lab.users.member.uid)
    ns = lab.netns
    pre = ["ip", "netns", "exec", ns, "ip"] if via_exec else ["ip", "-n", ns]
    t0 = time.perf_counter()
    for args in (
        ["tuntap", "add", "dev", BASELINE_TAP, "mode", "tap", "user", uid],
        ["link", "set", BASELINE_TAP, "master", "qvm0", "up"],
    ):
        proc = subprocess.run([*pre, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(pre + args)}: {proc.stderr}")
    ms = (time.perf_counter() - t0) * 1000
    nsrun(ns, "ip", "link", "del", BASELINE_TAP)
    return ms


def _helper_create(lab: LabEnv) -> float:
    """qemu-bridge-helper as QEMU runs it: a new TAP on the bridge, fd over a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = theirs.fileno()
        argv = ["ip", "netns", "exec", lab.netns, str(BRIDGE_HELPER), "--use-vnet"]
        argv += ["--br=qvm0", f"--fd={fd}"]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"qemu-bridge-helper: rc={proc.returncode}: {proc.stderr}")
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        ms = (time.perf_counter() - t0) * 1000
        if not fds:
            raise RuntimeError("qemu-bridge-helper passed no fd")
        os.close(fds[0])  # the TAP is not persistent: closing it deletes it
        return ms
    finally:
        ours.close()
        theirs.close()


class _BridgeConf:
    """/etc/qemu/bridge.conf `allow qvm0`, only if absent; removed afterwards."""

    def __init__(self) -> None:
        self.made_dir = False
        self.made_file = False

    def __enter__(self) -> _BridgeConf:
        if BRIDGE_CONF.exists():
            if "allow qvm0" not in BRIDGE_CONF.read_text().split("\n"):
                raise RuntimeError(f"{BRIDGE_CONF} exists without 'allow qvm0'; not touching it")
            return self
        if not BRIDGE_CONF.parent.exists():
            BRIDGE_CONF.parent.mkdir(mode=0o755)
            self.made_dir = True
        fd = os.open(BRIDGE_CONF, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.made_file = True
        with os.fdopen(fd, "w") as f:
            f.write("allow qvm0\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.made_file:
            BRIDGE_CONF.unlink(missing_ok=True)
        if self.made_dir:
            BRIDGE_CONF.parent.rmdir()


def bench_user_tap(lab: LabEnv, budget: Budget, results: Results) -> None:
    member = lab.users.member
    client = BusClient(member, lab.bus)
    root = BusClient(None, lab.bus)
    pid = lab.daemon_pid()
    try:
        # Warm-up (first polkit rules evaluation, page cache), then a check
        # that what qvmctl makes is really what QEMU needs.
        _qvmctl_create(lab, USER_TAP)
        problem = _check_tap_ready(lab, USER_TAP, member.uid)
        client.request("delete", USER_TAP)
        if problem:
            raise RuntimeError(f"qvmctl's TAP is not usable by QEMU: {problem}")
        client.request("cycle", USER_TAP, 5, 0)
        root.request("cycle", USER_TAP, 3, 0)

        helper_ok = BRIDGE_HELPER.exists()
        n = budget.n(30, 8)
        qvmctl_ms: list[float] = []
        ip_n: list[float] = []
        ip_exec: list[float] = []
        helper: list[float] = []
        helper_error = "" if helper_ok else f"{BRIDGE_HELPER} not installed (qemu-system-common)"
        with _BridgeConf() if helper_ok else _NoConf():
            # Each sample starts with qvmd idle (its healer's pass after the
            # previous change over): an isolated create, as a user's is.
            for _ in range(n):
                wait_idle(pid)
                qvmctl_ms.append(_qvmctl_create(lab, USER_TAP))
                client.request("delete", USER_TAP)
                wait_idle(pid)
                ip_n.append(_ip_create(lab, via_exec=False))
                wait_idle(pid)
                ip_exec.append(_ip_create(lab, via_exec=True))
                if helper_ok and not helper_error:
                    wait_idle(pid)
                    try:
                        helper.append(_helper_create(lab))
                    except RuntimeError as exc:
                        helper_error = str(exc)
        results.add(Row(S1, IP_N, "ms", ip_n, note="baseline", short="root ip -n"))
        results.add(Row(S1, IP_EXEC, "ms", ip_exec, note="baseline", short="root ip netns exec"))
        if helper:
            results.add(Row(S1, HELPER, "ms", helper, note="baseline", short="bridge-helper"))
        else:
            results.failed(S1, HELPER, helper_error)
        results.add(
            Row(S1, QVMCTL_CREATE, "ms", qvmctl_ms, IP_N, "≤ 2x root ip", _ratio_within(2.0))
        )
        results.add(
            Row(S1, QVMCTL_CREATE_2, "ms", qvmctl_ms, IP_EXEC, "≤ 2x root ip", _ratio_within(2.0))
        )
        if helper:
            results.add(Row(S1, QVMCTL_CREATE_3, "ms", qvmctl_ms, HELPER))

        nd = budget.n(100, 30)
        cyc = client.request("cycle", USER_TAP, nd, pid)
        rcyc = root.request("cycle", USER_TAP, budget.n(50, 15), pid)
        tight = client.request("cycle", USER_TAP, budget.n(100, 15), 0)
        polkit = client.request("polkit", "org.qvm.Net.manage-taps", nd)
        results.add(Row(S1, DBUS_ROOT, "ms", rcyc["create"], short="root D-Bus"))
        results.add(Row(S1, POLKIT, "ms", polkit, note="floor of the user's CreateTap"))
        results.add(
            Row(
                S1,
                DBUS_MEMBER,
                "ms",
                cyc["create"],
                DBUS_ROOT,
                "≤ 3 ms",
                lambda r, _b: r.median <= 3.0,
            )
        )
        results.add(
            Row(
                S1,
                DBUS_MEMBER_TIGHT,
                "ms",
                tight["create"],
                DBUS_MEMBER,
                note="each create waits for the healer's pass after the previous delete",
            )
        )
        results.add(
            Row(S1, "DeleteTap over D-Bus, qvm-group user (untimed above)", "ms", cyc["delete"])
        )
        _startup(lab, budget, results)
    finally:
        client.close()
        root.close()


class _NoConf:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _startup(lab: LabEnv, budget: Budget, results: Results) -> None:
    member = lab.users.member
    env = busenv.clean_env(lab.bus)
    floor: list[float] = []
    helps: list[float] = []
    status: list[float] = []
    for _ in range(budget.n(20, 5)):
        for out, cmd in (
            (floor, [PYTHON, "-c", "pass"]),
            (helps, [*QVMCTL, "--help"]),
            (status, [*QVMCTL, "status"]),
        ):
            ms, proc = timed_run(busenv.as_user_argv(member, cmd), env=env, cwd="/")
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd}: rc={proc.returncode}: {proc.stderr}")
            out.append(ms)
    floor_name = "`python -c pass` as the user (interpreter start)"
    results.add(Row(S1, floor_name, "ms", floor, note="baseline", short="python -c pass"))
    results.add(Row(S1, "`qvmctl --help` as the user", "ms", helps, floor_name))
    results.add(Row(S1, "`qvmctl status` as the user", "ms", status, floor_name))


# --- 2. scale ----------------------------------------------------------------

LEVELS = (10, 100, 1000)  # TAPs in the sandbox: 3 guests + background + the user's
BACKGROUND_FIRST = 1000  # qvm0tap1000...: made through qvmd by root for another uid
FILLER = "qvmbg"  # the rest: made directly, outside qvmd's prefix


def bench_scale(lab: LabEnv, budget: Budget, results: Results) -> None:
    """Per-operation latency as the lab grows.

    Background TAPs are made through qvmd (root's CreateTap, owned by another
    user) while a time budget lasts; past it, the rest are made directly with
    the same ioctls (bench/nsprobe.py mktaps) so the level is still reached
    and what the user feels at that size is still measured. Each row says
    how many of its TAPs qvmd made.
    """
    member, other = lab.users.member, lab.users.outsider
    client = BusClient(member, lab.bus)
    root = BusClient(None, lab.bus)
    pid = lab.daemon_pid()
    rss_base = "qvmd RSS, the user's lab (3 guest TAPs)"
    try:
        results.add(Row(S2, rss_base, "MB", [_rss(pid)], note="baseline", short="3-TAP lab"))
        bulk_left: float = budget.n(60, 8)  # seconds of daemon-made TAPs, all levels together
        sample_seconds = budget.n(20, 3)  # per level, after at least 2 samples
        n = budget.n(50, 15)
        via_qvmd = filler = 0
        base = f"CreateTap, qvm-group user, {LEVELS[0]} TAPs in the lab"
        for level in LEVELS:
            want = level - 4
            if bulk_left > 0 and via_qvmd + filler < want:
                t0 = time.monotonic()
                bulk: list[float] = root.request(
                    "bulk",
                    "qvm0tap",
                    BACKGROUND_FIRST + via_qvmd,
                    want - via_qvmd - filler,
                    other.uid,
                    bulk_left,
                )
                bulk_left -= time.monotonic() - t0
                if bulk:
                    results.add(
                        Row(
                            S2,
                            f"CreateTap, root, bulk, TAPs {via_qvmd + filler + 4}"
                            f"→{via_qvmd + filler + 4 + len(bulk)}",
                            "ms",
                            bulk,
                            note="stopped: time budget spent" if bulk_left <= 0 else "",
                        )
                    )
                via_qvmd += len(bulk)
            if via_qvmd + filler < want:
                count = want - via_qvmd - filler
                nsprobe(lab, "mktaps", FILLER, filler, count, other.uid)
                filler += count
            have = sum(
                1
                for link in links(lab.netns).values()
                if link.get("ifname", "").startswith(("qvm0tap", FILLER))
            )
            if level == LEVELS[0]:
                client.request("cycle", USER_TAP, 2, pid)
            least = 1 if budget.quick and level == LEVELS[-1] else 2
            got = client.request("cycles", USER_TAP, n, sample_seconds, least, pid)["create"]
            what = f"CreateTap, qvm-group user, {level} TAPs in the lab"
            note = f"{have + 1} TAPs, {via_qvmd + 3} made by qvmd"
            if level == LEVELS[0]:
                results.add(Row(S2, what, "ms", got, note=note + "; baseline", short="10 TAPs"))
            elif level == 1000:
                results.add(
                    Row(S2, what, "ms", got, base, "≤ 1.5x at 10", _ratio_within(1.5), note=note)
                )
            else:
                results.add(Row(S2, what, "ms", got, base, note=note))
        time.sleep(1.0)  # let the healer's passes for the last TAPs settle
        results.add(
            Row(
                S2,
                "qvmd RSS with 1,000 TAPs",
                "MB",
                [_rss(pid)],
                rss_base,
                "≤ 80 MB",
                lambda r, _b: r.median <= 80,
                note=f"{via_qvmd + 3} of them made by qvmd",
            )
        )
        ms, proc = timed_run(
            busenv.as_user_argv(member, [*QVMCTL, "--json", "tap", "list"]),
            env=busenv.clean_env(lab.bus),
            cwd="/",
        )
        if proc.returncode == 0:
            results.add(Row(S2, "`qvmctl tap list` with 1,000 TAPs", "ms", [ms]))
    finally:
        client.close()
        root.close()


def nsprobe(lab: LabEnv, *args: object) -> object:
    argv = ["ip", "netns", "exec", lab.netns, PYTHON, NS_PROBE, *(str(a) for a in args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"nsprobe {args[0]}: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout)


def _rss(pid: int) -> float:
    return rss_mb(pid)
