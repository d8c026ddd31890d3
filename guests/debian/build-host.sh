#!/bin/bash
# Build the "debian-host" guest: a debootstrapped Debian 12 (minbase) that is
# a *host* for qvmd, booted under QEMU to run qvmd under a real systemd as
# PID 1 (tests/e2e/test_systemd_unit_boot.py, docs/e2e-systemd.md).
#
# It holds qvmd's runtime dependencies (Debian packages) but not qvmd: each
# test run hands the guest the current tree and wheels on a second disk
# (label qvmdsrc, read-only). qvm-hosttest.service, baked in, runs
# /hosttest.sh from that disk when it is attached and does nothing otherwise.
#
# Outputs (in the cache dir, outside the repository), like guests/debian:
#   base.qcow2 (ext4, no partition table), vmlinuz, initrd.img, manifest
#
# Usage: guests/debian/build-host.sh      (as root: debootstrap and chroot)
#   QVM_GUEST_CACHE       cache dir (default /var/cache/qvmd-guests/debian-host)
#   QVM_DEBIAN_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   QVM_DEBIAN_REBUILD=1  rebuild everything even when the inputs are unchanged
#
# The two cached stages and the chroot's safety rules are common.sh's,
# shared with build.sh.
set -euo pipefail

cache=${QVM_GUEST_CACHE:-/var/cache/qvmd-guests/debian-host}
mirror=${QVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
image_size=4G  # sparse

# qvmd's runtime (scripts/install-deps.sh's "runtime" list), make for
# `make install`, dig for the DNS check. libpam-systemd: polkitd depends on
# the virtual "logind", which debootstrap cannot resolve by itself.
packages=(
    systemd-sysv udev dbus kmod e2fsprogs procps
    linux-image-cloud-amd64 initramfs-tools
    iproute2 netbase
    python3 python3-venv python3-nftables python3-systemd python3-yaml
    nftables dnsmasq-base polkitd libpam-systemd
    nfs-ganesha nfs-ganesha-vfs
    bind9-dnsutils make
    firewalld
)

builder=debian-host-build
script=$(readlink -f "$0")
image_inputs=""
# shellcheck source=guests/debian/common.sh
. "$(dirname "$script")/common.sh"
prepare_image

echo qvmhost | w etc/hostname 0644
w etc/hosts 0644 <<'EOF'
127.0.0.1	localhost qvmhost
::1		localhost ip6-localhost ip6-loopback
EOF
w etc/fstab 0644 <<'EOF'
/dev/vda	/	ext4	rw,errors=remount-ro	0	1
EOF
: | w etc/machine-id 0444
rm -f "$root/var/lib/dbus/machine-id"
echo LANG=C.UTF-8 | w etc/default/locale 0644

# The packaged NFS server and rpcbind would start at every boot (their
# packages enable them); qvmd runs its own ganesha in qvm-services, and a
# host that runs the packaged one too is not what this guest checks.
# Disabled, not masked: the binaries and units stay as Debian ships them.
systemctl --root="$root" disable nfs-ganesha.service nfs-ganesha-lock.service \
    rpcbind.service rpcbind.socket >&2
# firewalld is started by the test, while qvmd runs (a host where firewalld
# appears or reloads later is the case qvmd must handle).
systemctl --root="$root" disable firewalld.service >&2
# Nor anything that only costs boot time under TCG.
systemctl --root="$root" disable apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer >&2

# The test harness: runs /hosttest.sh from the disk labelled qvmdsrc (the
# tree under test, attached read-only) and reports on the serial console.
# After=qvmd.service: on the boot after the install, systemd has started
# (and qvmd has notified READY) or failed qvmd before the checks run.
# (Not After=multi-user.target: that target is ordered after what it wants.)
w etc/systemd/system/qvm-hosttest.service 0644 <<'EOF'
[Unit]
Description=qvm: run the qvmd host test from the attached disk (label qvmdsrc)
After=qvmd.service dbus.service polkit.service systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/qvm-hosttest
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
w usr/local/sbin/qvm-hosttest 0755 <<'EOF'
#!/bin/sh
# Mount the disk labelled qvmdsrc (if attached) and run its hosttest.sh.
dev=/dev/disk/by-label/qvmdsrc
i=0
while [ ! -e "$dev" ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
[ -e "$dev" ] || { echo "qvm-hosttest: no $dev, nothing to do"; exit 0; }
mkdir -p /run/qvmdsrc
if ! mount -o ro,noload "$dev" /run/qvmdsrc; then
    echo "QVM-HOSTTEST mount FAIL cannot mount $dev"
    systemctl poweroff
    exit 1
fi
exec /bin/sh /run/qvmdsrc/hosttest.sh /run/qvmdsrc
EOF
systemctl --root="$root" enable qvm-hosttest.service >&2

pack_image systemd python3 nftables dnsmasq-base polkitd nfs-ganesha dbus
