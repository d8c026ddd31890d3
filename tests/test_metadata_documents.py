"""The NoCloud documents and the QEMU arguments (pure, no root).

Documents are compared with golden files under tests/golden/metadata/
(regenerate with QVMD_UPDATE_GOLDEN=1 and review the diff). The golden
material is fixed fake PEM text, since the builders never parse it; a
separate test feeds real PKI output through and reads it back.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest
import yaml

from qvmd.metadata.documents import (
    DOCUMENT_NAMES,
    GuestMaterial,
    UserDataOptions,
    authorized_keys,
    build_documents,
    meta_data,
    network_config,
    seed_url,
    user_data,
)
from qvmd.metadata.qemu import qemu_args, smbios_serial
from qvmd.model import Lab, default_lab
from qvmd.pki.store import LabPki
from tests import golden

GOLDEN = Path(__file__).parent / "golden" / "metadata"

CA_PEM = b"-----BEGIN CERTIFICATE-----\nQ0EgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
CERT_PEM = b"-----BEGIN CERTIFICATE-----\nY3AgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nY3Aga2V5\n-----END PRIVATE KEY-----\n"
MATERIAL = GuestMaterial(
    cert_pem=CERT_PEM, fullchain_pem=CERT_PEM + CA_PEM, ca_pem=CA_PEM, key_pem=KEY_PEM
)
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForGoldenFilesOnly0000000000000000 me@host"


def check_golden(name: str, text: str) -> None:
    golden.check_golden(GOLDEN / name, text)


def load_cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n"), "user-data must start with #cloud-config"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_default_lab_documents_match_golden() -> None:
    lab = default_lab()
    cp = lab.guests[0]
    plain = build_documents(lab, cp, MATERIAL, UserDataOptions())
    check_golden("cp.meta-data", plain.meta_data.decode())
    check_golden("cp.user-data", plain.user_data.decode())
    check_golden("cp.vendor-data", plain.vendor_data.decode())
    check_golden("cp.network-config", plain.network_config.decode())
    full = user_data(
        lab, cp, MATERIAL, UserDataOptions(ssh_authorized_keys=(SSH_KEY,), disable_firewalld=True)
    )
    check_golden("cp.user-data-keys-firewalld", full)
    wk1 = build_documents(lab, lab.guests[1], MATERIAL, UserDataOptions())
    check_golden("wk-1.meta-data", wk1.meta_data.decode())
    check_golden("wk-1.network-config", wk1.network_config.decode())


def test_documents_by_name_cover_every_served_name() -> None:
    lab = default_lab()
    docs = build_documents(lab, lab.guests[0], MATERIAL, UserDataOptions())
    assert tuple(docs.by_name()) == DOCUMENT_NAMES


def test_the_key_is_not_in_the_repr_of_anything() -> None:
    lab = default_lab()
    docs = build_documents(lab, lab.guests[0], MATERIAL, UserDataOptions())
    assert b"Y3Aga2V5" not in repr(docs).encode()
    assert "Y3Aga2V5" not in repr(MATERIAL)


@pytest.mark.parametrize("name", ["cp", "wk-1", "wk-2"])
def test_each_guest_gets_its_own_identity(name: str) -> None:
    lab = default_lab()
    guest = lab.guest(name)
    assert guest is not None
    md = yaml.safe_load(meta_data(lab, guest))
    assert md == {"instance-id": f"qvm-{name}.qvm0.lan", "local-hostname": name}
    ud = load_cloud_config(user_data(lab, guest, MATERIAL, UserDataOptions()))
    assert (ud["hostname"], ud["fqdn"]) == (name, f"{name}.qvm0.lan")
    assert ud["prefer_fqdn_over_hostname"] is True
    nc = yaml.safe_load(network_config(lab, guest))
    (eth,) = nc["ethernets"].values()
    assert eth["match"] == {"macaddress": guest.mac}
    assert eth["addresses"] == [f"{guest.ip}/24"]


def test_user_data_writes_the_four_files_with_the_key_private() -> None:
    lab = default_lab()
    ud = load_cloud_config(user_data(lab, lab.guests[0], MATERIAL, UserDataOptions()))
    files = {f["path"]: f for f in ud["write_files"]}
    assert {p: f["content"].encode() for p, f in files.items()} == {
        "/root/cert/cert.pem": CERT_PEM,
        "/root/cert/key.pem": KEY_PEM,
        "/root/cert/fullchain.pem": CERT_PEM + CA_PEM,
        "/root/cert/qvm-ca.pem": CA_PEM,
    }
    assert {p: f["permissions"] for p, f in files.items()} == {
        "/root/cert/cert.pem": "0644",
        "/root/cert/key.pem": "0600",
        "/root/cert/fullchain.pem": "0644",
        "/root/cert/qvm-ca.pem": "0644",
    }
    assert ud["ca_certs"] == {"trusted": [CA_PEM.decode()]}
    assert "ca-certs" not in ud  # deprecated spelling
    assert "runcmd" not in ud and "ssh_authorized_keys" not in ud


def test_options_add_keys_and_firewalld_and_hostname_preference() -> None:
    lab = default_lab()
    opts = UserDataOptions(
        ssh_authorized_keys=(SSH_KEY, "ssh-rsa AAAAB3 other"),
        disable_firewalld=True,
        prefer_fqdn=False,
    )
    ud = load_cloud_config(user_data(lab, lab.guests[0], MATERIAL, opts))
    assert ud["ssh_authorized_keys"] == [SSH_KEY, "ssh-rsa AAAAB3 other"]
    (cmd,) = ud["runcmd"]
    assert "systemctl disable --now firewalld.service" in cmd
    assert ud["prefer_fqdn_over_hostname"] is False


def test_real_pki_material_round_trips_exactly(tmp_path: Path) -> None:
    lab = default_lab()
    pki = LabPki(tmp_path, lab)
    pki.ensure()
    issued = pki.issue("wk-2")
    material = GuestMaterial(
        cert_pem=issued.cert_pem,
        fullchain_pem=issued.fullchain_pem,
        ca_pem=pki.ca_pem(),
        key_pem=issued.key_pem,
    )
    ud = load_cloud_config(user_data(lab, lab.guests[2], material, UserDataOptions()))
    files = {f["path"]: f["content"].encode() for f in ud["write_files"]}
    assert files["/root/cert/key.pem"] == issued.key_pem
    assert files["/root/cert/cert.pem"] == issued.cert_pem
    assert files["/root/cert/fullchain.pem"] == issued.fullchain_pem
    assert files["/root/cert/qvm-ca.pem"] == pki.ca_pem()


def test_yaml_quotes_values_that_would_change_type() -> None:
    # An all-digit MAC is a base-60 integer in YAML 1.1 unless quoted.
    lab = default_lab()
    guest = dataclasses.replace(lab.guests[0], mac="52:54:10:20:30:40", name="1e3")
    nc = yaml.safe_load(network_config(lab, guest))
    assert nc["ethernets"]["lab0"]["match"]["macaddress"] == "52:54:10:20:30:40"
    ud = load_cloud_config(user_data(lab, guest, MATERIAL, UserDataOptions()))
    assert ud["hostname"] == "1e3"


def test_network_config_follows_the_lab() -> None:
    base = default_lab()
    services = dataclasses.replace(base.services, address=IPv4Address("192.168.77.3"))
    lab: Lab = dataclasses.replace(
        base, gateway=IPv4Interface("192.168.77.1/26"), domain="lab.test", services=services
    )
    guest = dataclasses.replace(base.guests[0], ip=IPv4Address("192.168.77.20"))
    eth = yaml.safe_load(network_config(lab, guest))["ethernets"]["lab0"]
    assert eth["addresses"] == ["192.168.77.20/26"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.77.1"}]
    assert eth["nameservers"] == {"addresses": ["192.168.77.3"], "search": ["lab.test"]}
    assert seed_url(lab) == "http://192.168.77.3/nocloud/"
    assert seed_url(lab, 8080) == "http://192.168.77.3:8080/nocloud/"


def test_bad_pem_is_refused() -> None:
    lab = default_lab()
    bad = dataclasses.replace(MATERIAL, key_pem=b"not a key")
    with pytest.raises(ValueError, match="private key"):
        user_data(lab, lab.guests[0], bad, UserDataOptions())


def test_authorized_keys_parsing() -> None:
    assert authorized_keys(["# mine", "", f"  {SSH_KEY}  "]) == (SSH_KEY,)
    with pytest.raises(ValueError, match="line 2"):
        authorized_keys([SSH_KEY, "rm -rf /"])


# --- QEMU arguments -----------------------------------------------------------


def test_qemu_args_default_guest() -> None:
    lab = default_lab()
    assert qemu_args(lab, lab.guests[0], seed_url(lab)) == [
        "-netdev",
        "tap,id=net0,ifname=qvm0tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=net0,mac=52:54:0a:2a:00:0a",
        "-smbios",
        "type=1,serial=ds=nocloud;s=http://10.42.0.2/nocloud/;dsmode=net",
    ]


@pytest.mark.parametrize(("queues", "vectors"), [(1, 4), (2, 6), (4, 10), (256, 514)])
def test_qemu_args_multi_queue(queues: int, vectors: int) -> None:
    lab = default_lab()
    guest = dataclasses.replace(lab.guests[1], multi_queue=True)
    args = qemu_args(lab, guest, seed_url(lab), queues=queues)
    assert args[1] == f"tap,id=net0,ifname=qvm0tap1,script=no,downscript=no,queues={queues}"
    assert args[3] == f"virtio-net-pci,netdev=net0,mac=52:54:0a:2a:00:0b,mq=on,vectors={vectors}"


@pytest.mark.parametrize("queues", [0, 257])
def test_qemu_args_refuse_bad_queue_counts(queues: int) -> None:
    lab = default_lab()
    guest = dataclasses.replace(lab.guests[1], multi_queue=True)
    with pytest.raises(ValueError, match="queues"):
        qemu_args(lab, guest, seed_url(lab), queues=queues)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://10.42.0.2/nocloud/", True),
        ("https://10.42.0.2:8443/x/", True),
        ("http://10.42.0.2/nocloud", False),  # cloud-init would fetch .../nocloudmeta-data
        ("file:///seed/", False),
        ("http://10.42.0.2/a;b/", False),
        ("http://10.42.0.2/a b/", False),
    ],
)
def test_smbios_serial_checks_the_url(url: str, ok: bool) -> None:
    if ok:
        assert smbios_serial(url) == f"ds=nocloud;s={url};dsmode=net"
    else:
        with pytest.raises(ValueError):
            smbios_serial(url)


def test_commas_are_escaped_for_qemu() -> None:
    lab = default_lab()
    args = qemu_args(lab, lab.guests[0], "http://10.42.0.2/a,b/")
    assert args[5] == "type=1,serial=ds=nocloud;s=http://10.42.0.2/a,,b/;dsmode=net"
