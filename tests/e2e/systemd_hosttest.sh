#!/bin/sh
# Guest side of tests/e2e/test_systemd_unit_boot.py (docs/e2e-systemd.md).
#
# Runs as root in the debian-host guest (guests/debian/build-host.sh), from
# qvm-hosttest.service, with $1 = the read-only disk the test attached:
#   $1/tree     the repository's Makefile, pyproject.toml, README.md, src/,
#               data/, scripts/ (what `make install` reads)
#   $1/wheels   wheels of qvmd's PyPI dependencies and setuptools (pip
#               installs offline from there: the guest has no network)
# One line per check on the serial console:
#   QVM-HOSTTEST <step> ok|FAIL up=<guest uptime, s> <detail>
# and on FAIL the command's output as QVM-HOSTTEST-OUT <step>: <line>.
# Boot 1 installs and checks, then reboots; boot 2 (marker file present)
# checks what systemd did at boot, then powers off. `QVM-HOSTTEST end`
# is always the last line.
src=${1:?usage: systemd_hosttest.sh SHARE}
marker=/var/lib/qvm-hosttest/phase1-done
user=alice
tap=qvm0tap5
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 SYSTEMD_PAGER="" SYSTEMD_COLORS=0

up() { cut -d' ' -f1 /proc/uptime; }
ok() { s=$1; shift; echo "QVM-HOSTTEST $s ok up=$(up) $*"; }
failed=0
fail() { s=$1; shift; failed=$((failed + 1)); echo "QVM-HOSTTEST $s FAIL up=$(up) $*"; }
dump() {  # dump STEP TEXT: the output of a failed command, line by line
    printf '%s\n' "$2" | tail -n "${3:-60}" | sed "s/^/QVM-HOSTTEST-OUT $1: /"
}
# check STEP CMD...: ok when CMD exits 0, else FAIL with its output
check() {
    s=$1
    shift
    out=$("$@" 2>&1)
    rc=$?
    if [ $rc = 0 ]; then
        ok "$s" "$(printf '%s' "$out" | tr '\n' ' ' | head -c 200)"
        return 0
    fi
    fail "$s" "rc=$rc: $*"
    dump "$s" "$out"
    return 1
}
# retry N CMD...: CMD until it succeeds, N tries 1 s apart
retry() {
    n=$1
    shift
    i=1
    while ! "$@"; do
        [ "$i" -ge "$n" ] && return 1
        i=$((i + 1))
        sleep 1
    done
}
unit_diag() {  # on a failure around qvmd: what systemd and qvmd said
    dump "$1" "$(systemctl status --no-pager -l qvmd 2>&1)" 30
    dump "$1" "$(journalctl -b --no-pager -o short-monotonic -u qvmd 2>&1)" 80
}
finish() {
    echo "QVM-HOSTTEST end up=$(up) phase=$1 failed=$failed"
    sync
}

dig_cp() {  # the lab DNS (dnsmasq in qvm-services) from the host side
    a=$(dig +short +time=2 +tries=1 @10.42.0.2 cp.qvm0.lan 2>&1)
    [ "$a" = 10.42.0.10 ] || { echo "dig answered: $a"; return 1; }
}
tap_owner_is_user() {
    l=$(ip -d link show "$tap" 2>&1) || { echo "$l"; return 1; }
    uid=$(id -u "$user")
    printf '%s\n' "$l" | grep -Eq "user ($user|$uid)( |\$)" || { echo "$l"; return 1; }
}
netns_inode() { stat -L -c %i /run/netns/qvm-services 2>/dev/null; }
show_warnings() {  # qvmd's warnings in this boot, for the record
    journalctl -b --no-pager -o cat -u qvmd -p warning 2>&1 | sed '/^$/d' \
        | sed 's/^/QVM-HOSTTEST-WARN /'
}
warnings_clean() {  # none of qvmd's warnings is about a denied operation
    bad=$(journalctl -b --no-pager -o cat -u qvmd -p warning 2>&1 \
        | grep -Ei 'EPERM|EACCES|not permitted|permission denied|seccomp|apparmor|avc|read-only file system|bad system call')
    # The kernel's audit records: seccomp kills/logs (type=1326), LSM denials.
    k=$(journalctl -b -k --no-pager -o cat 2>/dev/null \
        | grep -Ei 'type=1326|apparmor="DENIED"|avc: +denied')
    [ -z "$bad$k" ] || { printf '%s\n%s\n' "$bad" "$k"; return 1; }
}
if [ ! -e "$marker" ]; then
    # --- boot 1: install, start, use, restart ---------------------------------
    ok start "phase=1 kernel=$(uname -r) systemd=$(systemctl --version | head -n1 | cut -d' ' -f2)"
    rm -rf /var/tmp/qvmd-src
    # make install writes build/ and *.egg-info into the tree: a writable copy.
    check copy-tree cp -a "$src/tree" /var/tmp/qvmd-src
    # `make install` checks the runtime packages (all in the image, so no
    # apt-get: there is no network here); pip installs from the wheels only.
    t0=$(up)
    if check make-install env PIP_NO_INDEX=1 PIP_FIND_LINKS="$src/wheels" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 make -C /var/tmp/qvmd-src install; then
        echo "QVM-HOSTTEST-TIME make-install $(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')"
    fi
    check installed-files sh -c 'ls -l /usr/local/bin/qvmd /usr/local/bin/qvmctl \
        /usr/local/lib/systemd/system/qvmd.service /usr/local/lib/sysusers.d/qvmd.conf \
        /usr/local/lib/tmpfiles.d/qvmd.conf /usr/share/dbus-1/system.d/org.qvm.Net.conf \
        /usr/share/polkit-1/rules.d/50-org.qvm.Net.rules >/dev/null'
    check sysusers sh -c 'systemd-sysusers qvmd.conf && getent group qvm'
    check tmpfiles sh -c 'systemd-tmpfiles --create qvmd.conf && ls -ld /run/netns /var/lib/qvmd /etc/qvmd'
    check daemon-reload systemctl daemon-reload
    check unit-verify systemd-analyze verify --man=no qvmd.service
    t0=$(up)
    if check enable-now systemctl enable --now qvmd; then
        echo "QVM-HOSTTEST-TIME enable-now $(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')"
    else
        unit_diag enable-now
    fi
    check is-active systemctl is-active qvmd || unit_diag is-active
    check status busctl --no-pager call org.qvm.Net /org/qvm/Net org.qvm.Net Status
    check useradd useradd -m -G qvm -s /bin/sh "$user"
    if check tap-create runuser -u "$user" -- qvmctl tap create "$tap"; then
        check tap-owner tap_owner_is_user
    else
        unit_diag tap-create
    fi
    check dig retry 15 dig_cp || unit_diag dig
    check journal-field retry 10 sh -c "journalctl --no-pager -o cat -u qvmd QVM_TAP=$tap | grep ."
    check nft-tables sh -c 'nft list tables | grep -x "table inet qvm" && nft list tables | grep -x "table bridge qvm"'
    before=$(netns_inode)
    t0=$(up)
    if check restart systemctl restart qvmd; then
        echo "QVM-HOSTTEST-TIME restart $(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')"
    else
        unit_diag restart
    fi
    check restart-active systemctl is-active qvmd
    after=$(netns_inode)
    if [ -n "$before" ] && [ "$before" = "$after" ]; then
        ok netns-kept "inode=$before"
    else
        fail netns-kept "before=${before:-none} after=${after:-none}"
    fi
    check dig-after-restart retry 15 dig_cp || unit_diag dig-after-restart
    check nft-after-restart sh -c 'nft list tables | grep -x "table inet qvm"'
    check tap-after-restart tap_owner_is_user
    show_warnings
    check no-denials warnings_clean || unit_diag no-denials
    mkdir -p "${marker%/*}" && touch "$marker"
    finish 1
    systemctl reboot
    exit 0
fi

# --- boot 2: what systemd did at boot ----------------------------------------
ok start "phase=2"
check enabled systemctl is-enabled qvmd
if check boot-active systemctl is-active qvmd; then
    ok boot-ready "$(systemctl show -p ActiveEnterTimestampMonotonic -p NRestarts qvmd | tr '\n' ' ')"
else
    unit_diag boot-active
fi
check bridge-up sh -c 'ip -br link show qvm0 | grep -w UP && ip -4 -br addr show qvm0 | grep -F 10.42.0.1/24'
check tap-restored tap_owner_is_user
check tap-list sh -c "runuser -u $user -- qvmctl tap list | grep -w $tap"
check dig-at-boot retry 15 dig_cp || unit_diag dig-at-boot
check nft-at-boot sh -c 'nft list tables | grep -x "table inet qvm"'
# firewalld appears while qvmd runs: qvmd binds the bridge to firewalld's
# trusted zone (runtime only), again after a reload; its own tables stay and
# the lab keeps answering.
zone_is_trusted() {
    z=$(firewall-cmd --get-zone-of-interface=qvm0 2>&1)
    [ "$z" = trusted ] || { echo "zone of qvm0: $z"; return 1; }
}
check firewalld-start systemctl start firewalld
check firewalld-bound retry 30 zone_is_trusted || unit_diag firewalld-bound
check firewalld-reload firewall-cmd --reload
check firewalld-rebound retry 30 zone_is_trusted || unit_diag firewalld-rebound
check firewalld-tables sh -c 'nft list tables | grep -x "table inet qvm" \
    && nft list tables | grep -x "table inet firewalld"'
check firewalld-dig retry 15 dig_cp || unit_diag firewalld-dig
check firewalld-stop systemctl stop firewalld
show_warnings
check boot-no-denials warnings_clean || unit_diag boot-no-denials
finish 2
systemctl poweroff
