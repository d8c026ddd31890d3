"""Config parsing and validation: pure, no root."""

from __future__ import annotations

import tomllib
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvmd.config import check_subnet_free, load_config, parse_config
from qvmd.errors import ConfigError
from qvmd.model import default_lab, derive_mac


def test_default_is_exactly_the_users_tables() -> None:
    lab = parse_config({})
    assert lab == default_lab()
    assert lab.bridge == "qvm0"
    assert str(lab.gateway) == "10.42.0.1/24"
    assert lab.domain == "qvm0.lan"
    assert [(g.name, g.fqdn, str(g.ip), g.tap) for g in lab.guests] == [
        ("cp", "cp.qvm0.lan", "10.42.0.10", "qvm0tap0"),
        ("wk-1", "wk-1.qvm0.lan", "10.42.0.11", "qvm0tap1"),
        ("wk-2", "wk-2.qvm0.lan", "10.42.0.12", "qvm0tap2"),
    ]
    assert lab.services.address == IPv4Address("10.42.0.2")
    assert lab.services.interface == "veth0"
    assert lab.services.netns == "qvm-services"
    assert lab.services.dns_port == 5300


def test_macs_are_deterministic_unique_and_locally_administered() -> None:
    lab = default_lab()
    macs = [g.mac for g in lab.guests]
    assert macs == ["52:54:0a:2a:00:0a", "52:54:0a:2a:00:0b", "52:54:0a:2a:00:0c"]
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01


def test_sandbox_derives_services_namespace() -> None:
    assert parse_config({}, sandbox="lab7").services.netns == "lab7-svc"
    explicit = parse_config({"services": {"netns": "mine"}}, sandbox="lab7")
    assert explicit.services.netns == "mine"


def test_full_config_changes_every_value() -> None:
    text = """
    domain = "lab.test"
    [bridge]
    name = "lab0"
    address = "192.168.77.1/24"
    [taps]
    prefix = "lab0t"
    owner = 1000
    group = 1000
    multi_queue = true
    [services]
    netns = "lab-svc"
    interface = "svc0"
    bridge_port = "lab0-svc"
    address = "192.168.77.2"
    dns_port = 5353
    [[guests]]
    name = "a"
    ip = "192.168.77.20"
    tap = "lab0t5"
    mac = "02:00:00:00:00:01"
    owner = 2000
    multi_queue = false
    """
    lab = parse_config(tomllib.loads(text))
    assert lab.bridge == "lab0" and lab.domain == "lab.test"
    assert lab.subnet == IPv4Network("192.168.77.0/24")
    assert lab.tap_owner.uid == 1000 and lab.tap_owner.gid == 1000
    (g,) = lab.guests
    assert (g.name, g.fqdn, str(g.ip), g.tap, g.mac) == (
        "a",
        "a.lab.test",
        "192.168.77.20",
        "lab0t5",
        "02:00:00:00:00:01",
    )
    assert g.owner.uid == 2000 and g.owner.gid == 1000 and not g.multi_queue
    assert lab.services.dns_port == 5353 and lab.services.interface == "svc0"


def guest(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "x", "ip": "10.42.0.50", "tap": "qvm0tap9"}
    base.update(kw)
    return base


INVALID = [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"bridge": {"nmae": "qvm0"}}, "bridge.nmae", "unknown key"),
    ({"bridge": {"name": 5}}, "bridge.name", "must be a string, not an integer"),
    ({"bridge": {"name": "averyveryverylongname"}}, "bridge.name", "at most 15"),
    ({"bridge": {"name": "qvm 0"}}, "bridge.name", "refuses"),
    ({"bridge": {"name": "qvm/0"}}, "bridge.name", "refuses"),
    ({"bridge": {"name": "qvm:0"}}, "bridge.name", "refuses"),
    ({"bridge": {"name": ""}}, "bridge.name", "empty"),
    ({"bridge": {"name": ".."}}, "bridge.name", "reserved"),
    ({"bridge": {"address": "10.42.0.1"}}, "bridge.address", "prefix length"),
    ({"bridge": {"address": "10.42.0.300/24"}}, "bridge.address", "not an IPv4"),
    ({"bridge": {"address": "10.42.0.0/24"}}, "bridge.address", "network or broadcast"),
    ({"bridge": "qvm0"}, "bridge", "must be a table"),
    ({"services": {"dns_port": 70000}}, "services.dns_port", "not a port"),
    ({"services": {"dns_port": True}}, "services.dns_port", "must be an integer, not a boolean"),
    ({"services": {"address": "10.42.0.1"}}, "services.address", "gateway"),
    ({"services": {"address": "10.43.0.2"}}, "services.address", "outside the lab subnet"),
    ({"services": {"netns": "../etc"}}, "services.netns", "must be"),
    ({"services": {"bridge_port": "qvm0"}}, "services.bridge_port", "bridge's own name"),
    ({"services": {"bridge_port": "qvm0tap7"}}, "services.bridge_port", "collide"),
    ({"taps": {"owner": "no-such-user-qvm"}}, "taps.owner", "no such user"),
    ({"taps": {"group": "no-such-group-qvm"}}, "taps.group", "no such group"),
    ({"taps": {"owner": -1}}, "taps.owner", "out of range"),
    ({"taps": {"multi_queue": "yes"}}, "taps.multi_queue", "must be a boolean"),
    ({"guests": {"cp": {}}}, "guests", "array of tables"),
    ({"guests": [guest(ip="10.43.0.5")]}, "guests[0].ip", "outside the lab subnet"),
    ({"guests": [guest(ip="10.42.0.1")]}, "guests[0].ip", "gateway"),
    ({"guests": [guest(ip="10.42.0.2")]}, "guests[0].ip", "services address"),
    ({"guests": [guest(ip="10.42.0.255")]}, "guests[0].ip", "broadcast"),
    ({"guests": [guest(ip="nope")]}, "guests[0].ip", "not an IPv4"),
    ({"guests": [guest(name="Bad_Name")]}, "guests[0].name", "not a valid DNS label"),
    ({"guests": [guest(tap="eth0")]}, "guests[0].tap", "not of the form qvm0tap"),
    ({"guests": [guest(tap="qvm0tap01")]}, "guests[0].tap", "not of the form"),
    ({"guests": [guest(tap="qvm0tap999999999")]}, "guests[0].tap", "at most 15"),
    ({"guests": [guest(mac="01:00:00:00:00:01")]}, "guests[0].mac", "multicast"),
    ({"guests": [guest(mac="zz")]}, "guests[0].mac", "not of the form"),
    ({"guests": [guest(extra=1)]}, "guests[0].extra", "unknown key"),
    ({"guests": [{"ip": "10.42.0.50", "tap": "qvm0tap9"}]}, "guests[0].name", "required"),
    (
        {"guests": [guest(), guest(ip="10.42.0.51", tap="qvm0tap8")]},
        "guests[1].name",
        "already used by guests[0]",
    ),
    ({"guests": [guest(), guest(name="y", tap="qvm0tap8")]}, "guests[1].ip", "already used"),
    ({"guests": [guest(), guest(name="y", ip="10.42.0.51")]}, "guests[1].tap", "already used"),
    (
        {
            "guests": [
                guest(mac="02:00:00:00:00:01"),
                guest(name="y", ip="10.42.0.51", tap="qvm0tap8", mac="02:00:00:00:00:01"),
            ]
        },
        "guests[1].mac",
        "already used",
    ),
    ({"domain": "-bad.lan"}, "domain", "not a valid DNS label"),
    ({"pki": {"key_type": "dsa"}}, "pki.key_type", "not 'ec' or 'rsa'"),
    ({"pki": {"lifetime_days": 0}}, "pki.lifetime_days", "between 1 and 825"),
    ({"pki": {"renew_days": 400}}, "pki.renew_days", "below the lifetime"),
    ({"pki": {"colour": 1}}, "pki.colour", "unknown key"),
    ({"dns": {"upstreams": ["8.8.8.300"]}}, "dns.upstreams[0]", "not an IPv4"),
    ({"dns": {"upstreams": [53]}}, "dns.upstreams[0]", "must be a string"),
    ({"dns": {"lease_seconds": 10}}, "dns.lease_seconds", "between 120"),
    ({"metadata": {"port": 0}}, "metadata.port", "not a port"),
    ({"metadata": {"ssh_authorized_keys": ["not a key"]}}, "metadata.ssh_authorized_keys", ""),
    ({"metadata": {"enabled": "yes"}}, "metadata.enabled", "must be a boolean"),
    ({"nfs": {"bogus": 1}}, "nfs.bogus", "unknown"),
]


@pytest.mark.parametrize(
    ("data", "key", "reason"), INVALID, ids=[c[1] + ":" + c[2] for c in INVALID]
)
def test_invalid_config_names_key_and_reason(
    data: dict[str, object], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key, str(info.value)
    assert reason in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc", "would export '/etc'"),
        ("/var/lib/qvmd", "the CA key"),
        ("/", "would export"),
        ("/var/lib/qvmd/nfs", "share root"),
    ],
)
def test_nfs_export_paths_checked_against_the_state_dir(path: str, reason: str) -> None:
    from qvmd.config import check_state_dependent

    lab = parse_config({"nfs": {"exports": [{"name": "x", "path": path}]}})
    with pytest.raises(ConfigError, match=reason) as info:
        check_state_dependent(lab, "/var/lib/qvmd")
    assert info.value.key == "nfs.exports[0].path"


def test_load_missing_default_uses_embedded(tmp_path: Path) -> None:
    loaded = load_config(None, str(tmp_path / "absent.toml"))
    assert loaded.path is None and loaded.lab == default_lab()


def test_load_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "absent.toml"), "/nonexistent")


def test_load_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "q.toml"
    bad.write_text("[bridge]\nname = \n")
    with pytest.raises(ConfigError, match=r"q\.toml.*line 2"):
        load_config(str(bad), "/nonexistent")


def test_subnet_overlap_with_host_route_is_refused() -> None:
    lab = default_lab()
    with pytest.raises(ConfigError, match=r"overlaps the route 10\.0\.0\.0/8 on eth0") as info:
        check_subnet_free(
            lab, [(IPv4Network("0.0.0.0/0"), "eth0"), (IPv4Network("10.0.0.0/8"), "eth0")]
        )
    assert info.value.key == "bridge.address"
    # The default route and our own bridge's routes are fine (adoption).
    check_subnet_free(
        lab, [(IPv4Network("0.0.0.0/0"), "eth0"), (IPv4Network("10.42.0.0/24"), "qvm0")]
    )


@given(st.ip_addresses(v=4))
def test_derived_mac_is_valid_unicast_local(ip: IPv4Address) -> None:
    mac = derive_mac(ip)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert mac.endswith(":".join(f"{b:02x}" for b in ip.packed))


@given(st.text(max_size=40))
def test_any_bridge_name_is_accepted_or_refused_cleanly(name: str) -> None:
    try:
        lab = parse_config({"bridge": {"name": name}})
    except ConfigError as exc:
        assert exc.key in ("bridge.name", "services.bridge_port")
    else:
        raw = lab.bridge.encode()
        assert 0 < len(raw) <= 15 and "/" not in name and ":" not in name
