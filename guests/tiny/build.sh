#!/bin/bash
# Build the "tiny" lab guest: a Debian cloud kernel and a busybox initramfs
# holding the virtio-net and NFS client modules, curl, openssl and our /init.
#
# Outputs (in the cache dir, outside the repository):
#   vmlinuz       the kernel
#   initrd.img    gzip'd newc cpio archive
#   manifest      key=value lines: kernel version and source, output paths
#
# Usage: guests/tiny/build.sh            (as root or any user who can write the cache)
#   QVM_GUEST_CACHE   cache dir (default /var/cache/qvmd-guests/tiny)
#   QVM_TINY_KERNEL   where the kernel comes from:
#       apt  (default) `apt-get download` of the package linux-image-cloud-amd64
#            depends on (linux-image-<ver>-cloud-amd64): the same kernel on
#            every Debian 12 machine and in CI, whatever the host runs.
#       host /boot/vmlinuz-$(uname -r) and /lib/modules/$(uname -r): no
#            download, but only where the image is readable (Debian makes it
#            0600) and the host kernel has virtio-net/NFS client as modules
#            or built in (checked; the build fails with a message otherwise).
#   busybox comes from Debian's busybox-static package, fetched with
#   `apt-get download` too (installing it would replace the host's busybox).
#   curl and openssl are the host's, copied with the libraries ldd lists.
#
# Idempotent: every input (package versions, host binaries and libraries,
# this script, init) is hashed into a stamp; when the stamp matches and the
# outputs exist nothing is done. Downloaded .debs are kept in the cache so a
# change of init alone rebuilds without network.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${QVM_GUEST_CACHE:-/var/cache/qvmd-guests/tiny}
kernel_source=${QVM_TINY_KERNEL:-apt}

# The kernel modules the guest loads, in two sets with their dependencies
# (from modules.dep): the NIC's, loaded first thing, and the NFS client's,
# loaded only when a share is to be mounted (they take a second or more to
# load under TCG, which would otherwise delay the DHCP lease).
# virtio_pci/virtio_net pull net_failover/failover; nfsv4 pulls nfs, lockd,
# grace, sunrpc, fscache, netfs and dns_resolver. auth_rpcgss is loaded
# because the NFS client asks for it when it negotiates security flavours;
# rpcsec_gss_krb5 is deliberately left out: with a krb5 mechanism present
# the client tries krb5i for lease management first and waits for an
# rpc.gssd that does not exist here (tens of seconds) before using AUTH_SYS.
net_modules=(virtio_pci virtio_net)
nfs_modules=(nfsv4 auth_rpcgss)

log() { printf 'tiny-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in cpio gzip ldd sha256sum flock dpkg-deb; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
curl_bin=$(command -v curl) || die "curl is not installed (apt-get install curl)"
openssl_bin=$(command -v openssl) || die "openssl is not installed (apt-get install openssl)"

mkdir -p "$cache" "$cache/debs"
# Two builds at once (two test runs) would fight over the work dir.
exec 9>"$cache/.lock"
flock 9

pkg_field() {  # pkg_field PACKAGE FIELD -> the candidate version's field
    apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -n1
}

# --- resolve inputs (no network) -------------------------------------------
case "$kernel_source" in
    apt)
        command -v apt-get >/dev/null || die "QVM_TINY_KERNEL=apt needs apt-get (Debian/Ubuntu)"
        # The metapackage only depends on the versioned image package.
        kernel_pkg=$(pkg_field linux-image-cloud-amd64 Depends | tr ',' '\n' \
            | sed -n 's/^ *\(linux-image-[0-9][^ ]*-cloud-amd64\).*/\1/p' | head -n1)
        [ -n "$kernel_pkg" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"
        kernel_pkg_version=$(pkg_field "$kernel_pkg" Version)
        kernel_id="$kernel_pkg=$kernel_pkg_version"
        ;;
    host)
        kver=$(uname -r)
        host_vmlinuz=/boot/vmlinuz-$kver
        [ -r "$host_vmlinuz" ] || die "$host_vmlinuz is not readable (use QVM_TINY_KERNEL=apt)"
        [ -r "/lib/modules/$kver/modules.dep" ] || die "/lib/modules/$kver/modules.dep missing"
        kernel_id="host:$kver:$(sha256sum "$host_vmlinuz" | cut -d' ' -f1)"
        ;;
    *) die "QVM_TINY_KERNEL must be apt or host, not '$kernel_source'" ;;
esac
busybox_version=$(pkg_field busybox-static Version)
[ -n "$busybox_version" ] || die "busybox-static is unknown to apt (run apt-get update?)"

# Everything copied from the host: curl, openssl, their libraries, config.
host_files() {
    printf '%s\n' "$curl_bin" "$openssl_bin"
    ldd "$curl_bin" "$openssl_bin" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}'
    [ -e /etc/ssl/openssl.cnf ] && echo /etc/ssl/openssl.cnf
    return 0
}
mapfile -t copied < <(host_files | sort -u)

stamp=$(
    {
        echo "kernel $kernel_id"
        echo "busybox-static $busybox_version"
        echo "modules ${net_modules[*]} / ${nfs_modules[*]}"
        sha256sum "$here/build.sh" "$here/init" "${copied[@]}"
    } | sha256sum | cut -d' ' -f1
)

if [ -s "$cache/vmlinuz" ] && [ -s "$cache/initrd.img" ] && [ -s "$cache/manifest" ] \
    && [ "$(cat "$cache/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date in $cache"
    cat "$cache/manifest"
    exit 0
fi

# --- fetch -------------------------------------------------------------------
fetch_deb() {  # fetch_deb PACKAGE VERSION -> path of the .deb in the cache
    local pkg=$1 version=$2 deb
    deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
        [ "$(dpkg-deb -f "$f" Version)" = "$version" ] && echo "$f"; done | head -n1)
    if [ -z "$deb" ]; then
        log "downloading $pkg $version"
        find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" -delete
        # apt drops to _apt for downloads when it can write the target dir.
        if id _apt >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then chown _apt "$cache/debs"; fi
        (cd "$cache/debs" && apt-get download -q "$pkg=$version" >&2)
        deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
        [ -n "$deb" ] || die "apt-get download $pkg=$version produced no .deb"
    fi
    echo "$deb"
}

work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,root,var}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

case "$kernel_source" in
    apt)
        deb=$(fetch_deb "$kernel_pkg" "$kernel_pkg_version")
        dpkg-deb -x "$deb" "$work/kernel"
        vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n1)
        [ -n "$vmlinuz" ] || die "no vmlinuz in $deb"
        kver=${vmlinuz##*/vmlinuz-}
        moddir=$work/kernel/lib/modules/$kver
        # The package ships no modules.dep (postinst runs depmod).
        command -v depmod >/dev/null || die "depmod missing (apt-get install kmod)"
        depmod -b "$work/kernel" "$kver"
        ;;
    host)
        vmlinuz=$host_vmlinuz
        moddir=/lib/modules/$kver
        ;;
esac

bbdeb=$(fetch_deb busybox-static "$busybox_version")
dpkg-deb -x "$bbdeb" "$work/bb"
install -m 0755 "$work/bb/bin/busybox" "$root/bin/busybox"
# One symlink per applet, in the directory busybox itself names.
"$root/bin/busybox" --list-full | while read -r applet; do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# --- modules -----------------------------------------------------------------
# Dependency order: modules.dep lists each module's dependencies, deepest
# last; loading depth-first (dependencies before the module) with a seen-set
# gives a valid insmod order. Built-in modules have no line and are skipped.
declare -A seen=()
order=()
visit() {
    local name=$1 line path deps dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    line=$(grep -E "(^|/)${name}\.ko(\.(xz|zst|gz))?:" "$moddir/modules.dep" || true)
    if [ -z "$line" ]; then
        if grep -qE "(^|/)${name}\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
            log "$name is built into the kernel"
            return 0
        fi
        die "module $name is neither in modules.dep nor built in ($moddir)"
    fi
    path=${line%%:*}
    deps=${line#*:}
    for dep in $deps; do
        dep=${dep##*/}
        visit "${dep%%.ko*}"
    done
    order+=("$path")
}
mkdir -p "$root/lib/modules/$kver"
all_modules=()
add_modules() {  # add_modules LIST_FILE MODULE... : copy them, write the load order
    local m path base out
    order=()
    for m in "${@:2}"; do visit "${m//-/_}"; done
    : >"$1"
    for path in "${order[@]}"; do
        base=${path##*/}
        out=$root/lib/modules/$kver/${base%%.ko*}.ko
        # busybox insmod takes plain ELF only: decompress here, not in the guest.
        case "$path" in
            *.ko.xz) xz -dc "$moddir/$path" >"$out" ;;
            *.ko.zst) zstd -qdc "$moddir/$path" >"$out" ;;
            *.ko.gz) gzip -dc "$moddir/$path" >"$out" ;;
            *) cp "$moddir/$path" "$out" ;;
        esac
        echo "/lib/modules/$kver/${out##*/}" >>"$1"
        all_modules+=("${out##*/}")
    done
}
# The seen-set is shared: a module both sets need is loaded with the first.
add_modules "$root/etc/qvm-modules-net" "${net_modules[@]}"
add_modules "$root/etc/qvm-modules-nfs" "${nfs_modules[@]}"

# --- curl, openssl and their libraries ---------------------------------------
for f in "${copied[@]}"; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
done
# Debian's openssl reads /usr/lib/ssl/openssl.cnf, a link to /etc/ssl.
if [ -e "$root/etc/ssl/openssl.cnf" ]; then
    mkdir -p "$root/usr/lib/ssl"
    ln -sf /etc/ssl/openssl.cnf "$root/usr/lib/ssl/openssl.cnf"
fi

install -m 0755 "$here/init" "$root/init"
{
    echo "kernel_version=$kver"
    echo "kernel_source=$kernel_source ($kernel_id)"
    echo "busybox=$busybox_version"
    echo "curl=$("$curl_bin" --version | head -n1)"
    echo "openssl=$("$openssl_bin" version)"
} >"$root/etc/qvm-tiny-release"

# --- pack --------------------------------------------------------------------
# Fixed times and order: the same inputs give the same bytes.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -6 -n >"$work/initrd.img"
cp "$vmlinuz" "$work/vmlinuz"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"

mv -f "$work/vmlinuz" "$cache/vmlinuz"
mv -f "$work/initrd.img" "$cache/initrd.img"
{
    echo "kernel=$cache/vmlinuz"
    echo "initrd=$cache/initrd.img"
    echo "kernel_version=$kver"
    echo "kernel_source=$kernel_source"
    echo "kernel_id=$kernel_id"
    echo "busybox=$busybox_version"
    echo "modules=${all_modules[*]}"
} >"$cache/manifest"
# The stamp is written last: an interrupted build is redone next time.
echo "$stamp" >"$cache/stamp"
chmod 0755 "$cache"
log "built in $cache ($(du -h "$cache/initrd.img" | cut -f1) initrd, kernel $kver)"
cat "$cache/manifest"
