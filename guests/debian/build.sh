#!/bin/bash
# Build the "debian" lab guest: a debootstrapped Debian 12 (minbase) with the
# real cloud-init, nginx serving HTTPS with the certificate cloud-init writes
# to /root/cert, nfs-common, and a unit that reports on the serial console
# what cloud-init did (QVM-REPORT lines, see guests/debian/README.md).
#
# Outputs (in the cache dir, outside the repository):
#   base.qcow2    the root file system (ext4, no partition table): the
#                 backing file of each boot's throw-away overlay
#   vmlinuz       the image's Debian cloud kernel (from its /boot)
#   initrd.img    the image's initramfs (from its /boot)
#   manifest      key=value lines: output paths, kernel, package versions
#
# Usage: guests/debian/build.sh          (as root: debootstrap and chroot)
#   QVM_GUEST_CACHE       cache dir (default /var/cache/qvmd-guests/debian)
#   QVM_DEBIAN_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   QVM_DEBIAN_CA_STORE   lab-only (default) or full: the Mozilla CAs in the
#                         guest's trust store, see below
#   QVM_DEBIAN_REBUILD=1  rebuild everything even when the inputs are unchanged
#
# Two cached stages (base: debootstrap; image: our configuration) and the
# safety rules of the chroot are in common.sh, shared with build-host.sh.
set -euo pipefail

cache=${QVM_GUEST_CACHE:-/var/cache/qvmd-guests/debian}
mirror=${QVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
image_size=4G  # sparse; the guest sees this much disk
ca_store=${QVM_DEBIAN_CA_STORE:-lab-only}

# --no-install-recommends is debootstrap's behaviour: only Depends are pulled.
# python3-cffi-backend: cloud-init needs it (through python3-cryptography) but
# debootstrap cannot resolve the virtual package it is reached by.
packages=(
    systemd-sysv udev dbus kmod e2fsprogs
    linux-image-cloud-amd64 initramfs-tools
    ifupdown isc-dhcp-client netbase iproute2 iputils-ping
    cloud-init python3-cffi-backend
    ca-certificates openssl curl
    nginx-light
    nfs-common
)

builder=debian-build
script=$(readlink -f "$0")
image_inputs="ca_store=$ca_store"
# shellcheck source=guests/debian/common.sh
. "$(dirname "$script")/common.sh"
prepare_image

echo debian | w etc/hostname 0644
w etc/hosts 0644 <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
EOF
w etc/fstab 0644 <<'EOF'
/dev/vda	/	ext4	rw,errors=remount-ro	0	1
EOF
# Each boot must look like a new machine to systemd.
: | w etc/machine-id 0444
rm -f "$root/var/lib/dbus/machine-id"
# cloud-init's eni renderer writes interfaces.d/50-cloud-init (DHCP on the
# NIC, since 22.4 does not fetch network-config from an http seed).
w etc/network/interfaces 0644 <<'EOF'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
EOF
# The NoCloud seed comes from the SMBIOS serial (qvmctl qemu-args).
# The locale is already the image's (no locales package, no regeneration,
# which would fail), no SSH host keys without an SSH server, no GRUB (the
# kernel is booted directly; grub-dpkg only costs 2 s under TCG).
w etc/cloud/cloud.cfg.d/90-qvm.cfg 0644 <<'EOF'
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
ssh_genkeytypes: []
grub_dpkg:
  enabled: false
EOF
echo LANG=C.UTF-8 | w etc/default/locale 0644
# The trust store: with every Mozilla CA selected, the update-ca-certificates
# that cloud-init's ca_certs module runs takes about a minute under TCG (a
# few processes per certificate, then a rehash). QVM_DEBIAN_CA_STORE=lab-only (the
# default) deselects them, so the guest trusts the lab CA only; =full keeps
# Debian's list (e.g. for a guest that fetches from the real internet).
case "$ca_store" in
    lab-only)
        sed -i 's/^mozilla\//!mozilla\//' "$root/etc/ca-certificates.conf"
        in_root "$root" update-ca-certificates --fresh >&2
        # Then drop the deselected lines: every run handles each "!" line
        # with a basename and a sed (~12 s for ~140 lines under TCG).
        sed -i '/^!/d' "$root/etc/ca-certificates.conf"
        ;;
    full) ;;
    *) die "QVM_DEBIAN_CA_STORE must be lab-only or full, not $ca_store" ;;
esac
# With rpcsec_gss_krb5 present, the NFSv4 client tries krb5i for lease
# management first and waits for an rpc.gssd that is not running.
w etc/modprobe.d/qvm-nfs.conf 0644 <<'EOF'
blacklist rpcsec_gss_krb5
install rpcsec_gss_krb5 /bin/false
EOF

# HTTPS: nginx with the certificate cloud-init writes. nginx.service only
# starts once the key is there (qvm-https.path starts it then), so a boot
# without a seed does not fail it.
rm -f "$root/etc/nginx/sites-enabled/default"
w etc/nginx/sites-available/qvm-https 0644 <<'EOF'
server {
    listen 443 ssl default_server;
    listen [::]:443 ssl default_server;
    server_name _;
    ssl_certificate /root/cert/cert.pem;
    ssl_certificate_key /root/cert/key.pem;
    default_type text/plain;
    location / {
        return 200 "qvm-debian nginx on $hostname\n";
    }
}
EOF
ln -s ../sites-available/qvm-https "$root/etc/nginx/sites-enabled/qvm-https"
w etc/systemd/system/nginx.service.d/qvm.conf 0644 <<'EOF'
[Unit]
ConditionPathExists=/root/cert/key.pem
ConditionPathExists=/root/cert/cert.pem
EOF
w etc/systemd/system/qvm-https.path 0644 <<'EOF'
[Unit]
Description=qvm: start nginx once cloud-init wrote /root/cert/key.pem

[Path]
PathExists=/root/cert/key.pem
Unit=nginx.service

[Install]
WantedBy=multi-user.target
EOF

w etc/systemd/system/qvm-report.service 0644 <<'EOF'
[Unit]
Description=qvm: report what cloud-init did on the serial console
After=cloud-final.service qvm-https.path nginx.service
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/qvm-report
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=cloud-init.target
EOF
w usr/local/sbin/qvm-report 0755 <<'EOF'
#!/bin/sh
# One line per fact on the console, for the host to parse:
#   QVM-REPORT <name> ok|fail|skip up=<guest uptime, s> <detail key=value ...>
up() { cut -d' ' -f1 /proc/uptime; }
r() { name=$1 status=$2; shift 2; echo "QVM-REPORT $name $status up=$(up) $*"; }
mono() {  # seconds since boot when a unit became active
    v=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$1" 2>/dev/null)
    [ -n "$v" ] && [ "$v" != 0 ] && awk -v u="$v" 'BEGIN { printf "%.1f", u / 1e6 }' || echo -
}

r start ok "kernel=$(uname -r)"
r timing ok "cloud_init_local=$(mono cloud-init-local.service)" \
    "cloud_init=$(mono cloud-init.service)" "cloud_config=$(mono cloud-config.service)" \
    "cloud_final=$(mono cloud-final.service)"

# cloud-init's verdict (status --long prints several lines: one report each).
st=$(cloud-init status --long 2>&1)
res=$(python3 -c 'import json; r = json.load(open("/run/cloud-init/result.json"))["v1"]; print(len(r["errors"]), r["datasource"] or "-")' 2>/dev/null)
errs=${res%% *} ds=$(echo "${res#* }" | tr ' ' '_')
case "$st" in
    *"status: done"*) r cloud-init ok "errors=${errs:-?} datasource=${ds:-?}" ;;
    *) r cloud-init fail "errors=${errs:-?} datasource=${ds:-?}" ;;
esac
printf '%s\n' "$st" | while IFS= read -r line; do echo "QVM-REPORT-CI $line"; done
if [ -r /run/cloud-init/result.json ]; then
    python3 -c 'import json; [print("QVM-REPORT-CI error:", e) for e in json.load(open("/run/cloud-init/result.json"))["v1"]["errors"]]'
fi

r hostname ok "name=$(hostname)" "fqdn=$(hostname -f 2>/dev/null || echo -)" \
    "etc_hostname=$(cat /etc/hostname)"

files=""
for f in cert.pem key.pem fullchain.pem qvm-ca.pem; do
    m=$(stat -c '%a:%U' "/root/cert/$f" 2>/dev/null || echo missing)
    files="$files${files:+,}$f:$m"
done
if [ -d /root/cert ]; then r certs ok "files=$files dir=$(stat -c %a /root/cert)"
else r certs fail "files=$files"; fi

# The lab CA in the system trust store (cloud-init's ca_certs module).
capath=fail bundle=fail conf=no
openssl verify -CApath /etc/ssl/certs /root/cert/cert.pem >/dev/null 2>&1 && capath=ok
openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt /root/cert/cert.pem >/dev/null 2>&1 \
    && bundle=ok
grep -qx 'cloud-init-ca-certs.crt' /etc/ca-certificates.conf 2>/dev/null && conf=yes
if [ "$capath" = ok ] && [ "$bundle" = ok ]; then s=ok; else s=fail; fi
r trust "$s" "capath=$capath bundle=$bundle conf=$conf"

# HTTPS from inside, verified with the system trust store only.
fqdn=$(hostname -f 2>/dev/null || hostname)
https=fail detail=""
i=0
while [ $i -lt 30 ]; do
    if body=$(curl -sS --max-time 5 --resolve "$fqdn:443:127.0.0.1" "https://$fqdn/" 2>&1); then
        https=ok detail="verified=$fqdn body=$(echo "$body" | tr ' ' '_')"
        break
    fi
    detail="error=$(echo "$body" | tr ' ' '_' | head -c 120)"
    i=$((i + 1))
    sleep 1
done
r https "$https" "$detail nginx=$(systemctl is-active nginx.service)"

# The lab share: mount it and leave a file for the host to find.
# The share is root-squashed and 1777 (docs/nfs.md): root's files there
# belong to nobody, and with systemd's fs.protected_regular (2 here) the kernel
# refuses root an O_CREAT open of a file in a sticky world-writable
# directory owned by someone else, even the file that very open just
# created (EACCES after the create). So the mark is written by cloud-init's
# default user (debian), as a normal user would; what root gets is reported.
server=10.42.0.2
if mount -t nfs4 -o lookupcache=positive "$server:/lab" /mnt 2>/tmp/nfs.err; then
    vers=$(awk '$2 == "/mnt" { print $4 }' /proc/mounts | tr ',' '\n' | grep '^vers=')
    root_create=denied
    if echo "$fqdn root" >"/mnt/qvm-debian-root-$fqdn" 2>/dev/null; then root_create=ok; fi
    mark=/mnt/qvm-debian-$fqdn
    line="$fqdn $(date -u +%Y-%m-%dT%H:%M:%SZ) written by the debian guest"
    if runuser -u debian -- sh -c 'echo "$1" >"$2"' sh "$line" "$mark" 2>/tmp/nfs.err; then
        r nfs ok "$server:/lab on /mnt $vers wrote=$mark as=debian root_create=$root_create" \
            "protected_regular=$(cat /proc/sys/fs/protected_regular)"
    else
        r nfs fail "cannot write $mark as debian: $(tr ' \n' '__' </tmp/nfs.err | head -c 160)"
        {
            grep ' /mnt ' /proc/mounts
            ls -lnda /mnt /mnt/*
            dmesg | tail -n 5
        } 2>&1 | sed 's/^/QVM-REPORT-NFS /'
    fi
else
    r nfs fail "error=$(tr ' \n' '__' </tmp/nfs.err | head -c 160)"
fi

# Where the boot time went: when each stage started and how long it ran
# (guest uptime, s). systemd-analyze refuses while the boot (this unit
# included) is not finished, so read the units' timestamps instead.
span() {  # span UNIT -> start+duration
    systemctl show -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic \
        "$1" 2>/dev/null | awk -F= '
        /^InactiveExit/ { s = $2 } /^ActiveEnter/ { e = $2 }
        END { if (s > 0 && e > 0) printf "%.1f+%.1f", s / 1e6, (e - s) / 1e6; else print "-" }'
}
userspace=$(systemctl show -p UserspaceTimestampMonotonic --value 2>/dev/null)
echo "QVM-REPORT-BOOT userspace=$(awk -v u="${userspace:-0}" 'BEGIN { printf "%.1f", u / 1e6 }')" \
    "local-fs=$(span local-fs.target) cloud-init-local=$(span cloud-init-local.service)" \
    "networking=$(span networking.service) cloud-init=$(span cloud-init.service)" \
    "cloud-config=$(span cloud-config.service) cloud-final=$(span cloud-final.service)" \
    "nginx=$(span nginx.service)"
# And inside cloud-init: its slowest modules (from its own log).
cloud-init analyze blame 2>/dev/null | grep -E '^ +[0-9]' | head -n 8 \
    | sed 's/^ */QVM-REPORT-BOOT cloud-init /'

r done ok "host=$fqdn"
EOF

# Enable our units (offline: systemctl --root only creates the links).
systemctl --root="$root" enable qvm-https.path qvm-report.service >&2

pack_image cloud-init nginx-light nfs-common systemd
