#!/usr/bin/env bash
# Install the Debian 12 packages qvmd, its tests and its demo need, only if
# missing (so a prepared machine pays nothing). Run as root.
#   --runtime   only what the installed service needs (`make install`): a
#               user's host gets no QEMU, firewalld or debootstrap from us.
set -euo pipefail

RUNTIME=(
  python3 python3-venv python3-nftables python3-systemd python3-yaml nftables
  iproute2 dnsmasq-base dbus-daemon polkitd util-linux nfs-ganesha nfs-ganesha-vfs
)
# tests and demo: real clients and tools
TESTING=(
  iputils-ping busybox isc-dhcp-client bind9-dnsutils curl openssl systemd
  firewalld passwd cloud-init libnfs-utils qemu-system-x86 cpio kmod iperf3
  debootstrap qemu-utils
)

if [ "${1:-}" = --runtime ]; then
  PACKAGES=("${RUNTIME[@]}")
else
  PACKAGES=("${RUNTIME[@]}" "${TESTING[@]}")
  # The guest image builders resolve packages they only download (never
  # install): the package lists must know them, even when nothing is missing.
  if ! apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static >/dev/null 2>&1; then
    apt-get update -q
  fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
