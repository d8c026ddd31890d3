"""Debian's own cloud-init reads our seed and documents as it does at boot.

The cloud-init package (22.4 in Debian 12) is imported from
/usr/lib/python3/dist-packages by /usr/bin/python3 in a subprocess (the
venv does not see it). Its NoCloud datasources are given our SMBIOS serial
as the DMI serial number, exactly what qemu_args puts there, and fetch the
documents from our server from inside a guest namespace. Then cloud-init's
own user-data processing, schema validation, write_files and ca_certs
modules run on them, in a private mount namespace whose /root, trust store
directories and /etc/ca-certificates.conf are throwaway copies, so nothing
of this machine changes (the test checks that too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qvmd.metadata.documents import UserDataOptions, seed_url
from qvmd.metadata.qemu import qemu_args, smbios_serial
from qvmd.metadata.server import MetadataServer, PkiDocumentSource
from qvmd.model import default_lab
from qvmd.pki.store import LabPki
from tests.netns import netns, nsrun
from tests.test_metadata_server import LabNet, ServerThread, lab_in, lab_net

SYSTEM_PYTHON = "/usr/bin/python3"
CLOUDINIT = "/usr/lib/python3/dist-packages/cloudinit/sources/DataSourceNoCloud.py"

needs_cloudinit = pytest.mark.skipif(
    not os.path.exists(CLOUDINIT), reason="Debian's cloud-init package is not installed"
)

# How each seed form sets the datasource mode in cloud-init 22.4: the network
# stage only uses a datasource whose mode is "net".
FORMS_SCRIPT = r"""
import json, sys
from cloudinit.sources import DataSourceNoCloud as nocloud
out = {}
for serial in sys.argv[1:]:
    md = {}
    found = nocloud.load_cmdline_data(md, serial)
    out[serial] = {"found": found, "dsmode": md.get("dsmode"), "seedfrom": md.get("seedfrom")}
print(json.dumps(out))
"""

BOOT_SCRIPT = r"""
import json, logging, os, shutil, subprocess, sys
serial, out = sys.argv[1], sys.argv[2]
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from cloudinit import distros, dmi, helpers, url_helper, util
from cloudinit.cloud import Cloud
from cloudinit.config import cc_ca_certs, cc_write_files
from cloudinit.config.schema import validate_cloudconfig_schema
from cloudinit.net import eni, network_state
from cloudinit.sources import DataSourceNoCloud as nocloud

# What the guest's firmware and kernel would show cloud-init.
dmi.read_dmi_data = lambda key: serial if key == "system-serial-number" else None
util.get_cmdline = lambda: "root=/dev/vda1 ro"

paths = helpers.Paths({"cloud_dir": out + "/cloud", "run_dir": out + "/run"})
distro = distros.fetch("debian")("debian", {}, paths)
res = {}
# Local stage: NoCloud must decline an http seed; network stage: NoCloudNet.
res["local_found"] = nocloud.DataSourceNoCloud({}, distro, paths).get_data()
ds = nocloud.DataSourceNoCloudNet({}, distro, paths)
res["net_found"] = ds.get_data()
res["dsmode"] = ds.dsmode
res["instance_id"] = ds.get_instance_id()
res["local_hostname"] = ds.metadata.get("local-hostname")
res["vendor_data"] = (ds.get_vendordata_raw() or b"").decode()

parts = [p for p in ds.get_userdata().walk() if p.get_content_type() == "text/cloud-config"]
res["cloud_config_parts"] = len(parts)
cfg = util.load_yaml(parts[0].get_payload(decode=True))
import jsonschema  # noqa: F401  without it cloud-init skips validation silently
validate_cloudconfig_schema(cfg, strict=True)  # raises on errors and deprecations
res["keys"] = sorted(cfg)

cloud = Cloud(ds, paths, {}, distro, helpers.Runners(paths))
log = logging.getLogger("modules")
cc_write_files.handle("write_files", cfg, cloud, log, [])
cc_ca_certs.handle("ca_certs", cfg, cloud, log, [])
files = {}
os.makedirs(out + "/cert")
for name in sorted(os.listdir("/root/cert")):
    st = os.stat("/root/cert/" + name)
    files[name] = {"mode": oct(st.st_mode & 0o7777), "uid": st.st_uid}
    shutil.copy("/root/cert/" + name, out + "/cert/" + name)
res["files"] = files
# The default trust store (OpenSSL's /etc/ssl/certs) now holds the lab CA.
v = subprocess.run(["openssl", "verify", "/root/cert/cert.pem"], capture_output=True, text=True)
res["trust_store_verify"] = [v.returncode, v.stdout + v.stderr]
res["ca_conf"] = open("/etc/ca-certificates.conf").read()

# network-config: 22.4 does not fetch it from an http seed (24.3+ does);
# read it as those do and render it the way Debian 12 (ifupdown) would.
resp = url_helper.read_file_or_url(ds.metadata["seedfrom"] + "network-config", timeout=5)
state = network_state.parse_net_config_data(util.load_yaml(resp.contents))
eni.Renderer({"eni_path": "eni"}).render_network_state(state, target=out + "/render")
# update-ca-certificates prints to stdout too: the result is the last line.
print("\n" + json.dumps(res))
"""

# Throwaway copies, in the script's private mount namespace only.
MOUNT_AND_RUN = r"""
set -e
for d in /root /etc/ssl/certs /usr/share/ca-certificates /usr/local/share/ca-certificates \
         /etc/ca-certificates/update.d; do
    mount -t tmpfs -o mode=0755 qvt-ci "$d"
done
chmod 0700 /root
: > "$CONF"
mount --bind "$CONF" /etc/ca-certificates.conf
exec /usr/bin/python3 "$@"
"""


def run_forms(*serials: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", FORMS_SCRIPT, *serials],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    result: dict[str, dict[str, Any]] = json.loads(out)
    return result


@needs_cloudinit
def test_seed_forms_as_cloudinit_22_4_reads_them() -> None:
    url = "http://10.42.0.2/nocloud/"
    ours = smbios_serial(url)
    plain = f"ds=nocloud;s={url}"
    legacy = f"ds=nocloud-net;s={url}"
    forms = run_forms(ours, plain, legacy)
    assert forms[ours] == {"found": True, "dsmode": "net", "seedfrom": url}
    assert forms[legacy]["dsmode"] == "net"
    # The issue's failure: the plain form means "local", and cloud-init's
    # network stage discards a datasource in local mode.
    assert forms[plain]["dsmode"] == "local"


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[LabNet, LabPki, str]]:
    with lab_net() as net:
        lab = lab_in(net.services)
        pki = LabPki(tmp_path / "state", lab)
        pki.ensure()
        server = MetadataServer(lab, PkiDocumentSource(pki, UserDataOptions()))
        with ServerThread(server):
            cp = lab.guests[0]
            guest_ns = net.add_guest(cp.mac, str(cp.ip))
            yield net, pki, guest_ns


@pytest.mark.root
@needs_cloudinit
def test_cloudinit_boots_from_our_seed_and_writes_verifiable_certs(
    seeded: tuple[LabNet, LabPki, str], tmp_path: Path
) -> None:
    _, pki, guest_ns = seeded
    lab = default_lab()
    args = qemu_args(lab, lab.guests[0], seed_url(lab))
    serial = args[args.index("-smbios") + 1].removeprefix("type=1,serial=").replace(",,", ",")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "boot.py"
    script.write_text(BOOT_SCRIPT)
    host_conf = sha256("/etc/ca-certificates.conf")
    proc = nsrun(
        guest_ns,
        "env",
        f"CONF={tmp_path / 'ca-certificates.conf'}",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        MOUNT_AND_RUN,
        "sh",
        str(script),
        serial,
        str(out),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    # Nothing of this machine changed.
    assert sha256("/etc/ca-certificates.conf") == host_conf
    assert not Path("/usr/share/ca-certificates/cloud-init-ca-certs.crt").exists()

    assert res["local_found"] is False  # local stage declines an http seed
    assert (res["net_found"], res["dsmode"]) == (True, "net")
    assert (res["instance_id"], res["local_hostname"]) == ("qvm-cp.qvm0.lan", "cp")
    assert res["vendor_data"] == "#cloud-config\n{}\n"
    assert res["cloud_config_parts"] == 1
    assert {"write_files", "ca_certs", "hostname", "fqdn"} <= set(res["keys"])
    assert res["files"] == {
        "cert.pem": {"mode": "0o644", "uid": 0},
        "fullchain.pem": {"mode": "0o644", "uid": 0},
        "key.pem": {"mode": "0o600", "uid": 0},
        "qvm-ca.pem": {"mode": "0o644", "uid": 0},
    }
    assert res["ca_conf"] == "cloud-init-ca-certs.crt\n"
    assert res["trust_store_verify"][0] == 0, res["trust_store_verify"]

    cert = out / "cert"
    issued = pki.issue("cp")
    assert (cert / "key.pem").read_bytes() == issued.key_pem
    assert (cert / "qvm-ca.pem").read_bytes() == pki.ca_pem()
    assert (cert / "fullchain.pem").read_bytes() == issued.fullchain_pem
    ca_file, cert_file = str(cert / "qvm-ca.pem"), str(cert / "cert.pem")
    verify = subprocess.run(
        ["openssl", "verify", "-verify_hostname", "cp.qvm0.lan", "-CAfile", ca_file, cert_file],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    pub = [
        subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout
        for cmd in (
            ["openssl", "x509", "-noout", "-pubkey", "-in", str(cert / "cert.pem")],
            ["openssl", "pkey", "-pubout", "-in", str(cert / "key.pem")],
        )
    ]
    assert pub[0] == pub[1], "the key written is not the certificate's"

    # The entry matched the guest's NIC by MAC and kept its name (eth0 here).
    eni = (out / "render" / "eni").read_text()
    assert "iface eth0 inet static" in eni, eni
    assert "address 10.42.0.10/24" in eni, eni
    assert "dns-nameservers 10.42.0.2" in eni and "dns-search qvm0.lan" in eni, eni
    assert "post-up route add default gw 10.42.0.1 " in eni, eni
    rules = (out / "render" / "etc/udev/rules.d/70-persistent-net.rules").read_text()
    assert 'ATTR{address}=="52:54:0a:2a:00:0a", NAME="eth0"' in rules, rules


QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists(QEMU), reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("multi_queue", [False, True])
def test_qemu_accepts_the_args_and_attaches_to_the_tap(multi_queue: bool) -> None:
    """QEMU parses our argv (SMBIOS serial included) and opens the TAP."""
    lab = default_lab()
    guest = dataclasses.replace(lab.guests[0], multi_queue=multi_queue)
    args = qemu_args(lab, guest, seed_url(lab), queues=4)
    with netns("q") as ns:
        mq = ["multi_queue"] if multi_queue else []
        nsrun(ns, "ip", "tuntap", "add", guest.tap, "mode", "tap", *mq)
        nsrun(ns, "ip", "link", "set", guest.tap, "up")
        quiet = ["-display", "none", "-nodefaults", "-monitor", "none", "-serial", "none"]
        qemu = subprocess.Popen(
            ["ip", "netns", "exec", ns, QEMU, "-machine", "pc,accel=tcg", "-S", *quiet, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            link = ""
            while time.monotonic() < deadline and qemu.poll() is None:
                link = nsrun(ns, "ip", "-d", "link", "show", guest.tap).stdout
                if "LOWER_UP" in link:
                    break
                time.sleep(0.05)
            assert qemu.poll() is None, qemu.communicate()[1]
            assert "LOWER_UP" in link, f"QEMU did not attach to {guest.tap}:\n{link}"
            if multi_queue:
                queues = re.search(r"numqueues (\d+) numdisabled (\d+)", link)
                assert queues is not None, link
                assert int(queues[1]) + int(queues[2]) == 4, link
        finally:
            qemu.kill()
            qemu.communicate(timeout=10)
