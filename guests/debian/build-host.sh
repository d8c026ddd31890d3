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
# A separate script (not a flavour of build.sh) so that the "debian" image
# and its cache keys (which hash build.sh) stay exactly as they are. Same two
# stages, same safety: everything run in the chroot runs in private mount,
# network and PID namespaces, a policy-rc.d forbids starting services.
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
)

log() { printf 'debian-host-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot)"
for tool in debootstrap unshare chroot mkfs.ext4 qemu-img sha256sum flock systemctl; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (see guests/debian/README.md)"
done

script=$(readlink -f "$0")
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

work=$cache/work
cleanup() {
    if [ -d "$work" ]; then
        { findmnt -rn -o TARGET | grep -F "$work/" || true; } | sort -r | while read -r m; do
            umount -l "$m" || true
        done
    fi
    rm -rf "$work" || log "warning: could not remove $work"
}
trap cleanup EXIT

in_root() {
    local root=$1
    shift
    unshare --mount --net --pid --fork --kill-child --propagation private \
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"
}

# --- stage 1: base tree ------------------------------------------------------
build_base() {
    local root=$work/base
    rm -rf "$work"
    mkdir -p "$work"
    log "debootstrap (first stage, downloads) into $root"
    debootstrap --foreign --variant=minbase --components=main \
        --include="$(IFS=,; echo "${packages[*]}")" "$suite" "$root" "$mirror" >&2
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    log "debootstrap (second stage, dpkg in the chroot, no network)"
    in_root "$root" /debootstrap/debootstrap --second-stage >&2
    in_root "$root" apt-get clean
    rm -f "$root/usr/sbin/policy-rc.d"
    rm -rf "$cache/base-root"
    mv "$root" "$cache/base-root"
}

base_key=$(
    {
        echo "mirror=$mirror suite=$suite"
        printf '%s\n' "${packages[@]}"
        declare -f build_base in_root
    } | sha256sum | cut -d' ' -f1
)
image_key=$(
    {
        echo "base=$base_key size=$image_size"
        cat "$script"
    } | sha256sum | cut -d' ' -f1
)

if [ "${QVM_DEBIAN_REBUILD:-0}" = 1 ]; then
    rm -f "$cache/base-stamp" "$cache/stamp"
fi

t0=$(date +%s)
if [ "$(cat "$cache/base-stamp" 2>/dev/null)" != "$base_key" ] || [ ! -d "$cache/base-root" ]; then
    rm -f "$cache/stamp" "$cache/base-stamp"
    build_base
    echo "$base_key" >"$cache/base-stamp"
    log "base built in $(($(date +%s) - t0)) s"
else
    log "base up to date"
fi

if [ "$(cat "$cache/stamp" 2>/dev/null)" = "$image_key" ] \
    && [ -f "$cache/base.qcow2" ] && [ -f "$cache/vmlinuz" ] && [ -f "$cache/initrd.img" ] \
    && [ -f "$cache/manifest" ]; then
    log "image up to date"
    cat "$cache/manifest"
    exit 0
fi

# --- stage 2: configuration and image -----------------------------------------
rm -rf "$work"
mkdir -p "$work"
root=$work/root
log "copying the base tree"
cp -a "$cache/base-root" "$root"

w() {  # w PATH MODE: stdin -> $root/PATH
    mkdir -p "$(dirname "$root/$1")"
    cat >"$root/$1"
    chmod "$2" "$root/$1"
}

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

# --- pack ---------------------------------------------------------------------
kernel=$(find "$root/boot" -name 'vmlinuz-*' | sort | tail -n1)
[ -n "$kernel" ] || die "no kernel in the image's /boot"
kver=${kernel##*/vmlinuz-}
[ -f "$root/boot/initrd.img-$kver" ] || die "no initrd.img-$kver in the image's /boot"
cp "$kernel" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"

# shellcheck disable=SC2016  # dpkg-query's format, not a shell expansion
pkgver() { in_root "$root" dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo -; }
versions="systemd=$(pkgver systemd) python3=$(pkgver python3) nftables=$(pkgver nftables)"
versions="$versions dnsmasq-base=$(pkgver dnsmasq-base) polkitd=$(pkgver polkitd)"
versions="$versions nfs-ganesha=$(pkgver nfs-ganesha) dbus=$(pkgver dbus)"

log "mkfs.ext4 -d ($image_size, sparse)"
mkfs.ext4 -q -F -L qvm-root -d "$root" "$work/root.raw" "$image_size" >&2
log "qemu-img convert -> qcow2"
qemu-img convert -f raw -O qcow2 "$work/root.raw" "$work/base.qcow2"
chmod 0644 "$work/base.qcow2"

mv -f "$work/base.qcow2" "$cache/base.qcow2"
mv -f "$work/vmlinuz" "$cache/vmlinuz"
mv -f "$work/initrd.img" "$cache/initrd.img"
{
    echo "image=$cache/base.qcow2"
    echo "kernel=$cache/vmlinuz"
    echo "initrd=$cache/initrd.img"
    echo "kernel_version=$kver"
    echo "append=root=/dev/vda rw console=ttyS0"
    echo "debian_version=$(cat "$root/etc/debian_version")"
    echo "packages=$versions"
} >"$cache/manifest"
echo "$image_key" >"$cache/stamp"
chmod 0755 "$cache"
log "built in $cache in $(($(date +%s) - t0)) s" \
    "($(du -h --apparent-size "$cache/base.qcow2" | cut -f1) qcow2, kernel $kver)"
cat "$cache/manifest"
