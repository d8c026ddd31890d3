# shellcheck shell=bash
# shellcheck disable=SC2154  # builder, cache, packages, ...: set by the sourcing builder
# Shared by the Debian guest builders (build.sh: the lab guest with
# cloud-init; build-host.sh: a qvmd host under systemd). Sourced, not run.
#
# A builder sets `cache`, `mirror`, `suite`, `image_size`, `packages` (and
# `image_inputs`: anything else its image depends on), sources this file,
# calls `prepare_image` (exits when the cached image is up to date), writes
# its configuration into "$root" with `w`, then calls `pack_image PKG...`
# (the packages whose versions go into the manifest).
#
# Two stages, each with its own input hash, so only what changed is rebuilt:
#   base    debootstrap --variant=minbase with the builder's packages
#           (inputs: mirror, suite, package list, the stage's code); kept as a
#           tree in the cache (base-root/). The slow part (downloads, dpkg).
#   image   a copy of the tree + the builder's configuration (inputs: the
#           base stamp, the builder script and this file) -> ext4 -> qcow2;
#           kernel and initrd copied out.
#
# Safety: the debootstrap second stage and every command run in the chroot
# run in private mount, network and PID namespaces (unshare), so nothing the
# packages' maintainer scripts start can reach the host's network, mounts
# made there vanish with the namespace, and any leftover process is killed.
# A policy-rc.d forbids starting services during the build anyway.

log() { printf '%s: %s\n' "$builder" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run a command chrooted in $1 inside fresh mount/net/PID namespaces.
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
    # Never start a daemon inside the build (nginx, rpcbind, ...).
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    log "debootstrap (second stage, dpkg in the chroot, no network)"
    in_root "$root" /debootstrap/debootstrap --second-stage >&2
    in_root "$root" apt-get clean
    rm -f "$root/usr/sbin/policy-rc.d"
    rm -rf "$cache/base-root"
    mv "$root" "$cache/base-root"
}

cleanup() {
    # Nothing is mounted outside the private namespaces, but be sure.
    if [ -d "$work" ]; then
        { findmnt -rn -o TARGET | grep -F "$work/" || true; } | sort -r | while read -r m; do
            umount -l "$m" || true
        done
    fi
    rm -rf "$work" || log "warning: could not remove $work"
}

w() {  # w PATH MODE: stdin -> $root/PATH
    mkdir -p "$(dirname "$root/$1")"
    cat >"$root/$1"
    chmod "$2" "$root/$1"
}

# Lock the cache, build the base if its inputs changed, and exit if the image
# is up to date too; else leave a fresh copy of the base tree in "$root".
prepare_image() {
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot)"
    local tool
    for tool in debootstrap unshare chroot mkfs.ext4 qemu-img sha256sum flock systemctl; do
        command -v "$tool" >/dev/null || die "missing tool: $tool (see guests/debian/README.md)"
    done
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    work=$cache/work
    trap cleanup EXIT

    base_key=$(
        {
            echo "mirror=$mirror suite=$suite"
            printf '%s\n' "${packages[@]}"
            declare -f build_base in_root
        } | sha256sum | cut -d' ' -f1
    )
    image_key=$(
        {
            echo "base=$base_key size=$image_size $image_inputs"
            cat "$script" "${BASH_SOURCE[0]}"
        } | sha256sum | cut -d' ' -f1
    )
    if [ "${QVM_DEBIAN_REBUILD:-0}" = 1 ]; then
        rm -f "$cache/base-stamp" "$cache/stamp"
    fi
    t0=$(date +%s)
    if [ "$(cat "$cache/base-stamp" 2>/dev/null)" != "$base_key" ] \
        || [ ! -d "$cache/base-root" ]; then
        rm -f "$cache/stamp" "$cache/base-stamp"
        build_base
        echo "$base_key" >"$cache/base-stamp"
        log "base built in $(($(date +%s) - t0)) s"
    else
        log "base up to date"
    fi
    if [ "$(cat "$cache/stamp" 2>/dev/null)" = "$image_key" ] \
        && [ -f "$cache/base.qcow2" ] && [ -f "$cache/vmlinuz" ] \
        && [ -f "$cache/initrd.img" ] && [ -f "$cache/manifest" ]; then
        log "image up to date"
        cat "$cache/manifest"
        exit 0
    fi
    rm -rf "$work"
    mkdir -p "$work"
    root=$work/root
    log "copying the base tree"
    cp -a "$cache/base-root" "$root"
}

# pack_image PKG...: kernel and initrd out, ext4 -> qcow2, manifest, stamp.
pack_image() {
    local kernel kver versions="" p
    kernel=$(find "$root/boot" -name 'vmlinuz-*' | sort | tail -n1)
    [ -n "$kernel" ] || die "no kernel in the image's /boot"
    kver=${kernel##*/vmlinuz-}
    [ -f "$root/boot/initrd.img-$kver" ] || die "no initrd.img-$kver in the image's /boot"
    cp "$kernel" "$work/vmlinuz"
    cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
    chmod 0644 "$work/vmlinuz" "$work/initrd.img"
    for p in "$@"; do
        # shellcheck disable=SC2016  # dpkg-query's format, not a shell expansion
        versions="$versions${versions:+ }$p=$(in_root "$root" dpkg-query -W -f '${Version}' "$p" \
            2>/dev/null || echo -)"
    done
    {
        echo "debian_version=$(cat "$root/etc/debian_version")"
        echo "kernel_version=$kver"
        echo "packages=$versions"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$root/etc/qvm-debian-release"

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
    # The stamp is written last: an interrupted build is redone next time.
    echo "$image_key" >"$cache/stamp"
    chmod 0755 "$cache"
    log "built in $cache in $(($(date +%s) - t0)) s" \
        "($(du -h --apparent-size "$cache/base.qcow2" | cut -f1) qcow2, kernel $kver)"
    cat "$cache/manifest"
}
