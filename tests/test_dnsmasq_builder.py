"""Pure tests of the DHCP/DNS service parts: no root, no processes.

dnsmasq's files and the nft redirect are compared with golden files under
tests/golden/dnsmasq/ (regenerate with QVMD_UPDATE_GOLDEN=1 and review the
diff); parsing of resolv.conf and of the lease file is table-tested.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from qvmd.errors import Failed
from qvmd.model import Guest, default_lab
from qvmd.services.conffiles import Change
from qvmd.services.dnsmasq import (
    DnsmasqFiles,
    DnsmasqPaths,
    build_dnsmasq_conf,
    build_dnsmasq_files,
    build_servers_file,
    dnsmasq_argv,
    dnsmasq_child,
    reverse_zones,
    write_dnsmasq_files,
)
from qvmd.services.dnsredirect import build_dns_redirect, redirect_rules
from qvmd.services.leases import Lease, diff_leases, guest_of, parse_leases
from qvmd.services.upstreams import choose_upstreams, parse_nameservers, usable_upstreams
from tests import golden

GOLDEN = Path(__file__).parent / "golden" / "dnsmasq"
PATHS = DnsmasqPaths(Path("/var/lib/qvmd/dnsmasq"))


def check_golden(name: str, text: str) -> None:
    golden.check_golden(GOLDEN / name, text)


def test_default_lab_files_match_golden() -> None:
    files = build_dnsmasq_files(
        default_lab(), PATHS, [IPv4Address("192.0.2.53"), IPv4Address("198.51.100.53")]
    )
    check_golden("dnsmasq.conf", files.conf)
    check_golden("hosts", files.hosts)
    check_golden("dhcp-hosts", files.dhcp_hosts)
    check_golden("servers", files.servers)


def test_dns_redirect_matches_golden() -> None:
    text = json.dumps(build_dns_redirect(default_lab()), indent=2, sort_keys=True) + "\n"
    check_golden("dns-redirect.json", text)


def test_conf_has_what_the_lab_needs() -> None:
    conf = build_dnsmasq_conf(default_lab(), PATHS).splitlines()
    for line in [
        "port=53",
        "interface=veth0",
        "except-interface=lo",
        "bind-interfaces",
        "no-hosts",
        "no-resolv",
        "domain=qvm0.lan",
        "local=/qvm0.lan/",
        "local=/0.42.10.in-addr.arpa/",
        "dhcp-authoritative",
        "dhcp-option=option:router,10.42.0.1",
        "dhcp-option=option:dns-server,10.42.0.2",
        "dhcp-range=10.42.0.0,static,255.255.255.0,3600",
        "dhcp-leasefile=/var/lib/qvmd/dnsmasq/dnsmasq.leases",
        "pid-file=/var/lib/qvmd/dnsmasq/dnsmasq.pid",
    ]:
        assert line in conf, f"missing {line!r} in the dnsmasq conf"
    assert "log-dhcp" not in conf, "verbose DHCP logging must be opt-in"
    # Nothing that changes while the lab runs may be in the conf file.
    assert not any(line.startswith(("server=", "dhcp-host=", "address=")) for line in conf)


def test_conf_follows_the_model() -> None:
    lab = default_lab()
    other = replace(
        lab,
        domain="lab.example",
        services=replace(lab.services, interface="svc0", address=IPv4Address("10.42.0.3")),
    )
    conf = build_dnsmasq_conf(
        other, PATHS, 5353, lease_seconds=600, user="nobody", verbose_dhcp=True
    )
    for line in [
        "port=5353",
        "interface=svc0",
        "local=/lab.example/",
        "dhcp-option=option:dns-server,10.42.0.3",
        "dhcp-range=10.42.0.0,static,255.255.255.0,600",
        "user=nobody",
        "log-dhcp",
    ]:
        assert line in conf.splitlines(), f"missing {line!r}"


def test_guest_added_changes_only_reloadable_files() -> None:
    lab = default_lab()
    extra = Guest(
        "wk-3",
        "wk-3.qvm0.lan",
        IPv4Address("10.42.0.13"),
        "52:54:0a:2a:00:0d",
        "qvm0tap3",
        lab.tap_owner,
    )
    before = build_dnsmasq_files(lab, PATHS, [])
    after = build_dnsmasq_files(replace(lab, guests=(*lab.guests, extra)), PATHS, [])
    assert before.conf == after.conf
    assert "52:54:0a:2a:00:0d,10.42.0.13,wk-3" in after.dhcp_hosts.splitlines()
    assert "10.42.0.13 wk-3.qvm0.lan wk-3" in after.hosts.splitlines()


def test_hosts_names_fqdn_first_for_ptr() -> None:
    hosts = build_dnsmasq_files(default_lab(), PATHS, []).hosts.splitlines()
    assert "10.42.0.2 services.qvm0.lan services" in hosts
    assert "10.42.0.10 cp.qvm0.lan cp" in hosts


@pytest.mark.parametrize(
    ("subnet", "zones"),
    [
        ("10.42.0.0/24", ("0.42.10.in-addr.arpa",)),
        ("10.42.0.0/16", ("42.10.in-addr.arpa",)),
        ("10.0.0.0/8", ("10.in-addr.arpa",)),
        ("10.42.2.0/23", ("2.42.10.in-addr.arpa", "3.42.10.in-addr.arpa")),
        ("192.168.7.128/25", ("7.168.192.in-addr.arpa",)),
    ],
)
def test_reverse_zones(subnet: str, zones: tuple[str, ...]) -> None:
    assert reverse_zones(IPv4Network(subnet)) == zones


def test_reverse_zones_of_a_slash_20_cover_exactly_16_zones() -> None:
    zones = reverse_zones(IPv4Network("10.42.16.0/20"))
    assert len(zones) == 16
    assert zones[0] == "16.42.10.in-addr.arpa" and zones[-1] == "31.42.10.in-addr.arpa"


def test_servers_file_dedups_and_may_be_empty() -> None:
    a = IPv4Address("192.0.2.1")
    assert build_servers_file([a, a]).splitlines()[1:] == ["server=192.0.2.1"]
    assert build_servers_file([]).splitlines()[1:] == []


def test_argv_and_child_spec() -> None:
    assert dnsmasq_argv(PATHS) == [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/var/lib/qvmd/dnsmasq/dnsmasq.conf",
    ]
    spec = dnsmasq_child(default_lab("qvm-x"), PATHS)
    assert spec.netns == "qvm-x" and spec.argv[0] == "dnsmasq"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory whose parents others can enter (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="qvt-dnsmasq-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


def test_write_files_reports_reload_restart_or_nothing(open_dir: Path) -> None:
    paths = DnsmasqPaths(open_dir / "dnsmasq")
    lab = default_lab()
    files = build_dnsmasq_files(lab, paths, [])
    assert write_dnsmasq_files(paths, files) is Change.RESTART
    assert oct(paths.directory.stat().st_mode & 0o777) == "0o755"
    assert oct(paths.hosts.stat().st_mode & 0o777) == "0o644"
    assert write_dnsmasq_files(paths, files) is Change.NONE
    with_upstream = build_dnsmasq_files(lab, paths, [IPv4Address("192.0.2.9")])
    assert write_dnsmasq_files(paths, with_upstream) is Change.RELOAD
    new_conf = DnsmasqFiles(files.conf + "# x\n", files.hosts, files.dhcp_hosts, files.servers)
    assert write_dnsmasq_files(paths, new_conf) is Change.RESTART


def test_write_files_refuses_a_directory_dnsmasq_cannot_reach(open_dir: Path) -> None:
    closed = open_dir / "private"
    closed.mkdir(mode=0o700)
    paths = DnsmasqPaths(closed / "dnsmasq")
    with pytest.raises(Failed, match=r"private is mode 0700"):
        write_dnsmasq_files(paths, build_dnsmasq_files(default_lab(), paths, []))
    assert not paths.directory.exists()


def test_redirect_rules_follow_the_ports() -> None:
    lab = default_lab()
    rules = redirect_rules(lab)
    assert len(rules) == 4  # udp+tcp in prerouting and output
    assert all(r["expr"][-1] == {"redirect": {"port": 53}} for r in rules)
    assert all(r["expr"][1]["match"]["right"] == 5300 for r in rules)
    same_port = replace(lab, services=replace(lab.services, dns_port=53))
    assert redirect_rules(same_port) == []


# --- upstreams ---------------------------------------------------------------

RESOLVED_STUB = "# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
RESOLVED_REAL = "nameserver 192.0.2.1\nnameserver 2001:db8::1\nnameserver 192.0.2.2\n"


@pytest.mark.parametrize(
    ("resolv", "resolved", "servers", "source"),
    [
        ("nameserver 10.255.255.53\n", None, ["10.255.255.53"], "/etc/resolv.conf"),
        (
            RESOLVED_STUB,
            RESOLVED_REAL,
            ["192.0.2.1", "192.0.2.2"],
            "/run/systemd/resolve/resolv.conf",
        ),
        # resolv.conf names real servers: resolved's file is not used.
        ("nameserver 192.0.2.7\n", RESOLVED_REAL, ["192.0.2.7"], "/etc/resolv.conf"),
        # stub but resolved's file is missing: nothing usable.
        (RESOLVED_STUB, None, [], "/etc/resolv.conf"),
        ("nameserver 127.0.0.1\nnameserver 192.0.2.3\n", None, ["192.0.2.3"], "/etc/resolv.conf"),
        ("", None, [], "/etc/resolv.conf"),
    ],
)
def test_choose_upstreams(
    resolv: str, resolved: str | None, servers: list[str], source: str
) -> None:
    got = choose_upstreams(resolv, resolved)
    assert [str(s) for s in got.servers] == servers
    assert got.source == source


def test_skipped_upstreams_say_why() -> None:
    text = (
        "nameserver 127.0.0.53\nnameserver ::1\nnameserver fe80::1%eth0\n"
        "nameserver 2001:db8::53\nnameserver nonsense\nnameserver 0.0.0.0\n"
        "nameserver 192.0.2.1\nnameserver 192.0.2.1\n#nameserver 192.0.2.9\n"
    )
    got = usable_upstreams(text, "x")
    assert [str(s) for s in got.servers] == ["192.0.2.1"]
    reasons = dict(got.skipped)
    assert "loopback" in reasons["127.0.0.53"] and "loopback" in reasons["::1"]
    assert "link-local" in reasons["fe80::1%eth0"]
    assert "IPv6" in reasons["2001:db8::53"]
    assert "not an IP" in reasons["nonsense"]
    assert "unicast" in reasons["0.0.0.0"]


def test_parse_nameservers_ignores_other_lines() -> None:
    got = parse_nameservers("search lan\noptions ndots:2\nnameserver\nnameserver 192.0.2.1 x\n")
    assert [raw for raw, _ in got] == ["192.0.2.1"]


# --- leases ------------------------------------------------------------------

LEASES = """\
1800000000 52:54:0a:2a:00:0a 10.42.0.10 cp 01:52:54:0a:2a:00:0a
0 52:54:0a:2a:00:0b 10.42.0.11 * *
garbage line
1800000000 zz:54:0a:2a:00:0b 10.42.0.99 bad *
duid 00:01:00:01:2c:00:00:00:52:54:00:00:00:01
1800000000 1234 fd00::5 v6host 00:01
"""


def test_parse_leases() -> None:
    leases = parse_leases(LEASES)
    assert leases == (
        Lease(
            "52:54:0a:2a:00:0a", IPv4Address("10.42.0.10"), "cp", 1800000000, "01:52:54:0a:2a:00:0a"
        ),
        Lease("52:54:0a:2a:00:0b", IPv4Address("10.42.0.11"), None, None, None),
    )


def test_guest_of_needs_mac_and_ip() -> None:
    lab = default_lab()
    cp = Lease("52:54:0a:2a:00:0a", IPv4Address("10.42.0.10"), "cp", None, None)
    assert guest_of(cp, lab) == "cp"
    assert guest_of(replace(cp, ip=IPv4Address("10.42.0.11")), lab) is None
    assert guest_of(replace(cp, mac="52:54:00:00:00:01"), lab) is None


def test_diff_leases() -> None:
    a = Lease("52:54:0a:2a:00:0a", IPv4Address("10.42.0.10"), "cp", 100, None)
    b = Lease("52:54:0a:2a:00:0b", IPv4Address("10.42.0.11"), "wk-1", 100, None)
    a2 = replace(a, expiry=200)
    changes = diff_leases((a, b), (a2,))
    assert [(c.kind, c.lease.mac) for c in changes] == [("changed", a.mac), ("removed", b.mac)]
    assert changes[0].old == a
    assert [c.kind for c in diff_leases((), (a,))] == ["added"]
    assert diff_leases((a,), (a,)) == ()
