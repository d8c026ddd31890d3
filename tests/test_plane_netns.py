"""The network plane on the real kernel, with qvmd as a real process.

Every test runs qvmd in a namespace the test made (removed afterwards, with
the services namespace, even on failure); nothing touches the host's network.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import netns_exists, nsrun, run
from tests.qvmd_proc import Qvmd, qvmd_sandbox, state_dir

pytestmark = pytest.mark.root

TAP_CLIENT = str(Path(__file__).parent / "helpers" / "tap_client.py")
MEMBER_UID = 4242  # no account needed: the kernel only compares numbers
OTHER_UID = 4343


def links(ns: str) -> dict[str, dict[str, Any]]:
    out = nsrun(ns, "ip", "-d", "-j", "addr", "show").stdout
    return {link["ifname"]: link for link in json.loads(out)}


def forwarding(ns: str | None) -> str:
    cmd = ["sysctl", "-n", "net.ipv4.ip_forward"]
    return (nsrun(ns, *cmd) if ns else run(cmd)).stdout.strip()


def ipv4(link: dict[str, Any]) -> list[str]:
    return [
        f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a["family"] == "inet"
    ]


@pytest.fixture
def qvmd(tmp_path: Path) -> Iterator[Qvmd]:
    with qvmd_sandbox(tmp_path, f"[taps]\nowner = {MEMBER_UID}\n") as q:
        yield q


def test_bring_up_matches_the_users_tables(qvmd: Qvmd) -> None:
    host_forwarding = forwarding(None)
    qvmd.start()
    qvmd.wait_ready()
    have = links(qvmd.netns)
    bridge = have["qvm0"]
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert ipv4(bridge) == ["10.42.0.1/24"]
    assert "UP" in bridge["flags"]
    for i in range(3):
        tap = have[f"qvm0tap{i}"]
        data = tap["linkinfo"]["info_data"]
        assert (
            data["type"] == "tap"
            and data["vnet_hdr"]
            and data["persist"]
            and not data["multi_queue"]
        )
        assert data["user"] == str(MEMBER_UID) or data["user"] == MEMBER_UID
        assert tap["master"] == "qvm0" and "UP" in tap["flags"]
    assert have["qvm0-svc"]["master"] == "qvm0"
    svc = links(qvmd.services_netns)
    assert ipv4(svc["veth0"]) == ["10.42.0.2/24"]
    route = nsrun(qvmd.services_netns, "ip", "-j", "route", "show", "default").stdout
    assert json.loads(route)[0]["gateway"] == "10.42.0.1"
    # The lab is reachable from the services namespace through the bridge.
    nsrun(qvmd.services_netns, "ping", "-c1", "-W2", "10.42.0.1")
    assert forwarding(qvmd.netns) == "1"
    assert forwarding(None) == host_forwarding
    # Stopping leaves the lab up (guests keep running).
    qvmd.stop()
    assert qvmd.last_returncode == 0
    assert "qvm0tap1" in links(qvmd.netns)


def wait_quiet(path: Path, quiet: float = 1.5, limit: float = 10) -> int:
    """Wait until a growing log file stops growing; return its size.

    The kernel reports carrier and bridge-port changes through linkwatch up
    to a second late, so events of a previous run can still be arriving.
    """
    import time

    deadline = time.monotonic() + limit
    size, since = path.stat().st_size, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = path.stat().st_size
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return size
    raise AssertionError(f"kernel events never settled:\n{path.read_text()}")


def wait_ipv6_settled(netns: str, links_with_carrier: tuple[str, ...], limit: float = 10) -> None:
    """Wait until IPv6 duplicate address detection is over on the given links.

    The kernel gives a link with carrier an fe80:: address and announces it
    again when DAD completes, up to ~2 s later (random start delay + one
    probe interval). Those are the kernel's events, not qvmd's; let them
    pass before the quiet window the test measures.
    """
    import time

    deadline = time.monotonic() + limit
    while True:
        out = nsrun(netns, "ip", "-j", "-6", "address", "show").stdout
        addrs = {link["ifname"]: link.get("addr_info", []) for link in json.loads(out or "[]")}
        pending = [
            name
            for name in links_with_carrier
            if not any(a.get("scope") == "link" for a in addrs.get(name, []))
            or any(a.get("tentative") for a in addrs.get(name, []))
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"IPv6 DAD never settled on {pending}: {out}")
        time.sleep(0.1)


def test_second_reconcile_changes_nothing(qvmd: Qvmd, tmp_path: Path) -> None:
    qvmd.start()
    qvmd.wait_ready()
    qvmd.stop()
    wait_ipv6_settled(qvmd.netns, ("qvm0", "qvm0-svc"))
    log = tmp_path / "monitor.log"
    with open(log, "w") as sink:
        monitor = subprocess.Popen(
            ["ip", "netns", "exec", qvmd.netns, "ip", "monitor", "link", "address", "route"],
            stdout=sink,
        )
    try:
        offset = wait_quiet(log)
        qvmd.start()
        qvmd.wait_ready()
        out = qvmd.stop()
        wait_quiet(log)
    finally:
        monitor.terminate()
        monitor.wait(timeout=5)
    assert "lab qvm0 up (0 change(s)" in out, out
    events = log.read_text()[offset:]
    assert events.strip() == "", f"a second start changed the kernel:\n{events}"


def test_objects_with_wrong_settings_are_corrected_in_place(qvmd: Qvmd) -> None:
    qvmd.start()
    qvmd.wait_ready()
    qvmd.stop()
    ns = qvmd.netns
    nsrun(ns, "ip", "link", "set", "qvm0tap1", "nomaster")
    nsrun(ns, "ip", "link", "set", "qvm0tap2", "down")
    nsrun(ns, "ip", "addr", "flush", "dev", "qvm0")
    tap0_index = links(ns)["qvm0tap0"]["ifindex"]
    qvmd.start()
    qvmd.wait_ready()
    out = qvmd.stop()
    have = links(ns)
    assert have["qvm0tap1"]["master"] == "qvm0"
    assert "UP" in have["qvm0tap2"]["flags"]
    assert ipv4(have["qvm0"]) == ["10.42.0.1/24"]
    assert have["qvm0tap0"]["ifindex"] == tap0_index  # adopted, not recreated
    assert "lab qvm0 up (3 change(s)" in out, out


def wait_forwarding(ns: str, port: str, timeout: float = 5) -> None:
    """The kernel applies a carrier change through linkwatch, up to ~1 s
    later: frames sent before the bridge port forwards are dropped."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = nsrun(ns, "bridge", "-j", "link", "show", "dev", port).stdout
        if json.loads(out)[0].get("state") == "forwarding":
            return
        time.sleep(0.02)
    raise AssertionError(f"bridge port {port} never reached forwarding")


class TapClient:
    def __init__(self, ns: str, tap: str, uid: int, mode: str = "attach") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, TAP_CLIENT, ns, tap, str(uid), str(uid), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.status = self.proc.stdout.readline().strip()
        if self.status == "attached":
            wait_forwarding(ns, tap)

    def arp(self, target: str = "10.42.0.1") -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"arp 52:54:0a:2a:00:0a 10.42.0.10 {target}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_adopts_a_tap_held_by_qemu(qvmd: Qvmd, sig: int) -> None:
    qvmd.start()
    qvmd.wait_ready()
    client = TapClient(qvmd.netns, "qvm0tap0", MEMBER_UID)
    try:
        assert client.status == "attached"
        assert client.arp() == "reply 52:54:0a:2a:00:01"
        index = links(qvmd.netns)["qvm0tap0"]["ifindex"]
        qvmd.stop(sig)
        assert client.arp() == "reply 52:54:0a:2a:00:01"  # the lab outlives qvmd
        qvmd.start()
        qvmd.wait_ready()
        assert client.arp() == "reply 52:54:0a:2a:00:01"
        assert links(qvmd.netns)["qvm0tap0"]["ifindex"] == index
    finally:
        client.close()


def test_tap_ownership_is_enforced_by_the_kernel(qvmd: Qvmd) -> None:
    qvmd.start()
    qvmd.wait_ready()
    own = TapClient(qvmd.netns, "qvm0tap1", MEMBER_UID)
    other = TapClient(qvmd.netns, "qvm0tap2", OTHER_UID)
    create = TapClient(qvmd.netns, "qvm0tap7", MEMBER_UID, mode="create")
    try:
        assert own.status == "attached"
        assert other.status == "error EPERM"
        assert create.status == "error EPERM"
        assert "qvm0tap7" not in links(qvmd.netns)
    finally:
        for c in (own, other, create):
            c.close()


def test_teardown_leaves_nothing(qvmd: Qvmd) -> None:
    before = forwarding(qvmd.netns)
    qvmd.start()
    qvmd.wait_ready()
    qvmd.stop()
    result = qvmd.teardown()
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(links(qvmd.netns)) == {"lo"}
    assert not netns_exists(qvmd.services_netns)
    assert forwarding(qvmd.netns) == before == "0"
    assert "removed bridge qvm0" in result.stdout


def test_teardown_does_not_touch_what_is_not_ours(qvmd: Qvmd) -> None:
    ns = qvmd.netns
    # (this kernel has no dummy driver: veth pairs stand in for foreign devices)
    nsrun(
        ns, "ip", "link", "add", "qvm0tapx", "type", "veth", "peer", "foreign0"
    )  # not <prefix><N>
    nsrun(
        ns, "ip", "link", "add", "qvm0tap5", "type", "veth", "peer", "foreign1"
    )  # ours? not a TAP
    qvmd.start()
    qvmd.wait_ready()
    qvmd.stop()
    qvmd.teardown()
    assert set(links(ns)) == {"lo", "qvm0tapx", "qvm0tap5", "foreign0", "foreign1"}


def test_foreign_device_with_our_bridge_name_is_refused(qvmd: Qvmd) -> None:
    nsrun(qvmd.netns, "ip", "link", "add", "qvm0", "type", "veth", "peer", "foreign0")
    qvmd.start()
    assert qvmd.proc is not None
    qvmd.proc.wait(timeout=20)
    out = qvmd.stop()
    assert qvmd.last_returncode == 1
    assert "qvm0 exists but is a veth, not a bridge" in out
    assert links(qvmd.netns)["qvm0"]["linkinfo"]["info_kind"] == "veth"


def test_bad_config_changes_nothing(tmp_path: Path) -> None:
    with qvmd_sandbox(
        tmp_path, '[[guests]]\nname = "cp"\nip = "10.99.0.10"\ntap = "qvm0tap0"\n'
    ) as q:
        q.start()
        assert q.proc is not None
        q.proc.wait(timeout=20)
        out = q.stop()
        assert q.last_returncode == 78
        assert "guests[0].ip: 10.99.0.10 is outside the lab subnet 10.42.0.0/24" in out
        assert set(links(q.netns)) == {"lo"}
        assert not netns_exists(q.services_netns)
        assert not q.state_dir.exists()


def test_subnet_overlapping_a_host_route_is_refused(qvmd: Qvmd) -> None:
    nsrun(qvmd.netns, "ip", "link", "add", "uplink0", "type", "veth", "peer", "uplink1")
    nsrun(qvmd.netns, "ip", "addr", "add", "10.0.0.5/8", "dev", "uplink0")
    nsrun(qvmd.netns, "ip", "link", "set", "uplink0", "up")
    qvmd.start()
    assert qvmd.proc is not None
    qvmd.proc.wait(timeout=20)
    out = qvmd.stop()
    assert qvmd.last_returncode == 78
    assert "bridge.address: lab subnet 10.42.0.0/24 overlaps the route 10.0.0.0/8 on uplink0" in out
    assert set(links(qvmd.netns)) == {"lo", "uplink0", "uplink1"}
    assert not netns_exists(qvmd.services_netns)


def test_sandbox_created_by_qvmd_is_removed_at_exit(tmp_path: Path) -> None:
    from tests.netns import unique_name

    ns = unique_name("own")
    q = Qvmd(ns, state_dir())
    try:
        q.start()
        q.wait_ready()
        assert netns_exists(ns) and netns_exists(f"{ns}-svc")
        q.stop()
        assert q.last_returncode == 0
        assert not netns_exists(ns) and not netns_exists(f"{ns}-svc")
    finally:
        q.close()
        from tests.netns import delete_netns

        delete_netns(f"{ns}-svc")
        delete_netns(ns)
        shutil.rmtree(q.state_dir.parent, ignore_errors=True)


def test_self_heal_recreates_deleted_bridge_and_reenslaves(qvmd: Qvmd) -> None:
    import time

    qvmd.start()
    qvmd.wait_ready()
    nsrun(qvmd.netns, "ip", "link", "del", "qvm0")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        have = links(qvmd.netns)
        if (
            "qvm0" in have
            and all(have[f"qvm0tap{i}"].get("master") == "qvm0" for i in range(3))
            and (
                have["qvm0-svc"].get("master") == "qvm0" and ipv4(have["qvm0"]) == ["10.42.0.1/24"]
            )
        ):
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"bridge not repaired: {sorted(links(qvmd.netns))}")
    nsrun(qvmd.services_netns, "ping", "-c1", "-W2", "10.42.0.1")


def test_prepare_netns_creates_only_the_namespaces(qvmd: Qvmd) -> None:
    """What the unit's ExecStartPre=+ runs: the services namespace made
    outside the sandbox, then adopted by the daemon."""
    out = run(qvmd.args("--prepare-netns"), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert netns_exists(qvmd.services_netns)
    assert set(links(qvmd.netns)) == {"lo"}  # no link made yet
    qvmd.start()
    qvmd.wait_ready()
    log = qvmd.stop()
    assert "created namespace" not in log and "created veth" in log


def test_tap_in_use_keeps_its_owner_and_the_rest_is_reconciled(qvmd: Qvmd) -> None:
    qvmd.start()
    qvmd.wait_ready()
    client = TapClient(qvmd.netns, "qvm0tap0", MEMBER_UID)
    try:
        assert client.status == "attached"
        qvmd.stop()
        assert qvmd.config is not None
        qvmd.config.write_text(f"[taps]\nowner = {OTHER_UID}\n")
        qvmd.start()
        qvmd.wait_ready()
        out = qvmd.stop()
        assert "qvm0tap0 is in use; its owner cannot change now" in out
        info = links(qvmd.netns)
        assert str(info["qvm0tap0"]["linkinfo"]["info_data"]["user"]) == str(MEMBER_UID)
        assert str(info["qvm0tap1"]["linkinfo"]["info_data"]["user"]) == str(OTHER_UID)
        assert client.arp() == "reply 52:54:0a:2a:00:01"  # the guest never noticed
    finally:
        client.close()
