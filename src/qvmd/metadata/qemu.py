"""The QEMU arguments that attach a guest to the lab and point it at its seed.

Pure: `qemu_args` is a function of the lab, the guest and the seed URL.

The seed travels in the SMBIOS system serial number, which cloud-init reads
from /sys/class/dmi/id/product_serial. The form matters:

- `ds=nocloud;s=http://.../` does NOT work with cloud-init 22.4 (Debian
  12). `ds=nocloud` sets the datasource mode to `local`; the local stage's
  NoCloud refuses an http seed (it takes only `/` and `file://`), the
  network stage's NoCloudNet fetches meta-data, user-data and vendor-data,
  and then cloud-init's main sees a datasource in `local` mode during the
  network stage and exits without using it (`[network] Exiting. datasource
  ... in local mode`), so the instance ends up with DataSourceNone. That is
  the failure the issue describes.
- `ds=nocloud;s=http://.../;dsmode=net` (what we emit) works with 22.4: an
  explicit `dsmode` on the command line wins over the one implied by the
  name. cloud-init 24.1 and later also keep an explicit dsmode (and infer
  `net` from an http seed when there is none).
- `ds=nocloud-net;s=http://.../` works with 22.4 too, but 24.1 deprecated
  that name and logs a deprecation warning for it.
- The URL must end with `/`: cloud-init appends `meta-data` etc. to it
  verbatim.

tests/test_metadata_cloudinit.py runs Debian's cloud-init against these
forms to keep this true.
"""

from __future__ import annotations

from qvmd.model import Guest, Lab

NETDEV_ID = "net0"
# The kernel's limit on the queues of one TAP (MAX_TAP_QUEUES).
MAX_QUEUES = 256
DEFAULT_QUEUES = 4


def smbios_serial(seed_url: str) -> str:
    """The SMBIOS type 1 serial number that makes cloud-init use the seed."""
    if not seed_url.startswith(("http://", "https://")) or not seed_url.endswith("/"):
        raise ValueError(f"the seed URL must be http(s) and end with '/': {seed_url!r}")
    if ";" in seed_url or any(c.isspace() for c in seed_url):
        # cloud-init splits the serial on ';' and the command line on spaces.
        raise ValueError(f"the seed URL may not contain ';' or spaces: {seed_url!r}")
    return f"ds=nocloud;s={seed_url};dsmode=net"


def _qemu_opt(value: str) -> str:
    # QEMU's option parser separates options with ','; a literal comma is ',,'.
    return value.replace(",", ",,")


def qemu_args(lab: Lab, guest: Guest, seed_url: str, *, queues: int = DEFAULT_QUEUES) -> list[str]:
    """`-netdev`, `-device` and `-smbios` for `guest`, as one argv list.

    The TAP exists already (qvmd made it, owned by the user), so QEMU runs
    no script. No `vhost=`: QEMU's default for a TAP is without vhost-net,
    which an unprivileged QEMU usually cannot open anyway. A multi-queue
    TAP gets `queues` queues; the guest should have at least that many
    vCPUs to use them (`vectors` = 2 per queue pair + 2, as QEMU documents).
    """
    if guest.multi_queue and not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues must be 1-{MAX_QUEUES}, not {queues}")
    netdev = f"tap,id={NETDEV_ID},ifname={guest.tap},script=no,downscript=no"
    device = f"virtio-net-pci,netdev={NETDEV_ID},mac={guest.mac}"
    if guest.multi_queue:
        netdev += f",queues={queues}"
        device += f",mq=on,vectors={2 * queues + 2}"
    return [
        "-netdev",
        netdev,
        "-device",
        device,
        "-smbios",
        "type=1,serial=" + _qemu_opt(smbios_serial(seed_url)),
    ]


__all__ = ["DEFAULT_QUEUES", "MAX_QUEUES", "NETDEV_ID", "qemu_args", "smbios_serial"]
