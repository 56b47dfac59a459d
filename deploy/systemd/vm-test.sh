#!/usr/bin/env bash
# Tests the Debian package and its systemd unit under a real systemd: boots a small Debian
# bookworm VM with qemu (software emulation is enough), installs the .deb there, runs etcd as a
# systemd service on loopback, and checks start (READY only once registered), reload (a service
# added; a broken config refused with the field named in the journal), stop (drained, exit 0),
# and the hardening (read-only system, writable state dir, no new privileges, no capabilities),
# and records `systemd-analyze security meshnode`. Prints one PASS/FAIL line per check; exits
# non-zero on any FAIL.
#
#   deploy/systemd/vm-test.sh [PATH-TO-meshnode]   default: target/debug/meshnode (built if missing)
#   deploy/systemd/vm-test.sh --image-only         build (or keep) the cached image, no test
#
#   MESHNODE_VM_DIR=DIR        image cache (default target/vm); delete it to rebuild the image
#   MESHNODE_VM_TIMEOUT=SECS   bound on the VM run (default 1800); qemu is killed after it
#   MESHNODE_VM_SMP=N          guest CPUs (default 2)
#
# Needs root (debootstrap, chroot), debootstrap, qemu-system-x86_64, mkfs.ext4/debugfs
# (e2fsprogs), dpkg-deb, and the Debian mirror apt uses on this host. The guest has no network
# interface other than loopback (-nic none). The image (about 1 GB, built once, 5-9 minutes)
# is never modified by a run: its disk is attached with snapshot=on; the .deb and the test
# script go in on a second small disk, which also brings the results back.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
SUITE=bookworm
# Bump when the image recipe below changes: a cached image of another revision is rebuilt.
IMAGE_REV=2
PACKAGES=systemd,systemd-sysv,udev,dbus,linux-image-amd64,etcd-server,etcd-client,iproute2
vm_dir=${MESHNODE_VM_DIR:-$repo/target/vm}
timeout=${MESHNODE_VM_TIMEOUT:-1800}
smp=${MESHNODE_VM_SMP:-2}

log() { printf '[vm-test] %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

case "${1:-}" in
-h | --help)
    sed -n '2,21s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
--image-only)
    image_only=1
    shift
    ;;
esac
image_only=${image_only:-0}

bin="${1:-$repo/target/debug/meshnode}"
[[ $(id -u) == 0 ]] || die "needs root (debootstrap and chroot build the image)"
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 debugfs dpkg-deb objcopy; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
if ((!image_only)); then
    if [[ -z "${1:-}" && ! -x "$bin" ]]; then
        (cd "$repo" && cargo build -p meshnode)
    fi
    [[ -x "$bin" ]] || die "no meshnode binary at $bin"
fi

# The first Debian (non-security) mirror URI apt uses on this host, one-line or deb822
# (as deploy/docker/build-base.sh finds it).
apt_uri() {
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk '
        function pick(u) {
            if (u !~ /^(https?|ftp):\/\//) return 0
            if (u !~ /debian/ || u ~ /security/) return 0
            print u; found = 1; exit
        }
        /^[[:space:]]*#/ { next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if (pick($i)) exit }
        $1 == "URIs:" { for (i = 2; i <= NF; i++) if (pick($i)) exit }
    ' "${files[@]}" | head -n1
}

# The guest's test runner, part of the image: mounts the payload disk, runs its guest.sh with
# the output on the console and in results.txt on that disk, then powers the VM off.
runner_script() {
    cat <<'RUNNER'
#!/bin/bash
set -o pipefail
for _ in $(seq 1 100); do [ -b /dev/vdb ] && break; sleep 0.1; done
mkdir -p /mnt/payload
mount /dev/vdb /mnt/payload || { echo "vm-test runner: no payload disk"; systemctl poweroff; exit 1; }
bash /mnt/payload/guest.sh 2>&1 | tee /mnt/payload/results.txt
echo "exit $?" | tee -a /mnt/payload/results.txt
journalctl -b --no-pager >/mnt/payload/journal.txt 2>&1 || true
sync
umount /mnt/payload
systemctl poweroff --no-block
RUNNER
}

runner_unit() {
    cat <<'UNIT'
[Unit]
Description=meshnode VM test runner (deploy/systemd/vm-test.sh)
After=etcd.service systemd-journald.service local-fs.target
Wants=etcd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/meshnode-vm-test-runner
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
}

# debootstrap mounts /proc in the tree it builds; an interrupted build leaves it.
unmount_under() {
    local m
    findmnt -rn -o TARGET | { grep "^$1/" || true; } | sort -r | while read -r m; do umount -l "$m"; done
}

build_image() {
    local mirror rootfs t0=$SECONDS
    mirror=$(apt_uri)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs="$vm_dir/rootfs"
    unmount_under "$rootfs"
    rm -rf "$rootfs" "$vm_dir/root.raw" "$vm_dir/vmlinuz" "$vm_dir/initrd.img" "$vm_dir/image.rev"
    mkdir -p "$vm_dir"
    log "debootstrap --variant=minbase $SUITE from $mirror with $PACKAGES (several minutes)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "${mirror%/}/" \
        >"$vm_dir/debootstrap.log" 2>&1 || {
        tail -n 30 "$vm_dir/debootstrap.log" >&2
        die "debootstrap failed (log: $vm_dir/debootstrap.log)"
    }
    # An initramfs with just what it takes to mount an ext4 root on virtio: quicker to unpack
    # under emulation than the default one with every module.
    cat >"$rootfs/etc/initramfs-tools/conf.d/vm-test" <<'CONF'
MODULES=list
COMPRESS=gzip
CONF
    printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >>"$rootfs/etc/initramfs-tools/modules"
    chroot "$rootfs" update-initramfs -u -k all >>"$vm_dir/debootstrap.log" 2>&1 ||
        die "update-initramfs failed (log: $vm_dir/debootstrap.log)"
    echo meshnode-vm >"$rootfs/etc/hostname"
    # debootstrap writes no /etc/hosts (etcd's default listen URL names localhost) and copies
    # this host's resolv.conf (useless without a network).
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tmeshnode-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$rootfs/etc/hosts"
    : >"$rootfs/etc/resolv.conf"
    printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
    # No password: root logs in on the serial console (the VM has no network).
    chroot "$rootfs" passwd -d root >/dev/null
    runner_script >"$rootfs/usr/local/sbin/meshnode-vm-test-runner"
    chmod 0755 "$rootfs/usr/local/sbin/meshnode-vm-test-runner"
    runner_unit >"$rootfs/etc/systemd/system/meshnode-vm-test.service"
    ln -sf /etc/systemd/system/meshnode-vm-test.service \
        "$rootfs/etc/systemd/system/multi-user.target.wants/meshnode-vm-test.service"
    # Nothing on this VM needs these; they only slow down a boot under emulation.
    for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
        dpkg-db-backup.timer systemd-timesyncd.service getty@tty1.service; do
        ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
    done
    cp "$rootfs"/boot/vmlinuz-* "$vm_dir/vmlinuz"
    cp "$rootfs"/boot/initrd.img-* "$vm_dir/initrd.img"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    : >"$rootfs/etc/machine-id"
    unmount_under "$rootfs"
    mkfs.ext4 -q -F -L root -d "$rootfs" "$vm_dir/root.raw" 2G
    rm -rf "$rootfs"
    echo "$IMAGE_REV $PACKAGES" >"$vm_dir/image.rev"
    log "image built in $((SECONDS - t0)) s: $vm_dir/root.raw"
}

t_start=$SECONDS
if [[ -f $vm_dir/root.raw && "$(cat "$vm_dir/image.rev" 2>/dev/null)" == "$IMAGE_REV $PACKAGES" ]]; then
    log "cached image $vm_dir/root.raw"
else
    build_image
fi
((!image_only)) || exit 0

# The payload disk: the package, the test script; the guest writes results.txt onto it.
work=$(mktemp -d /var/tmp/meshnode-vm-test.XXXXXX)
qemu_pid=
cleanup() {
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        sleep 1
        kill -9 "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
# Debug info makes a debug build ~200 MB; the package gets the same binary without it.
objcopy --strip-debug "$bin" "$work/meshnode"
deb=$(MESHNODE_DEB_VERSION="$("$bin" version | awk '{print $2}')-vmtest" MESHNODE_DEB_COMPRESSION=gzip \
    "$repo/deploy/debian/build-deb.sh" "$work/meshnode" | tail -n1)
mkdir "$work/payload"
cp "$deb" "$work/payload/meshnode.deb"
cp "$here/vm-test-guest.sh" "$work/payload/guest.sh"
mkfs.ext4 -q -F -L payload -d "$work/payload" "$work/payload.raw" 256M

log "booting the VM (qemu, TCG, -smp $smp; bounded by ${timeout}s); console: $vm_dir/console.log"
t_boot=$SECONDS
nice -n 10 qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp "$smp" -m 1024 \
    -display none -no-reboot -nic none \
    -serial "file:$vm_dir/console.log" \
    -kernel "$vm_dir/vmlinuz" -initrd "$vm_dir/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 quiet systemd.show_status=0" \
    -drive "file=$vm_dir/root.raw,format=raw,if=virtio,snapshot=on" \
    -drive "file=$work/payload.raw,format=raw,if=virtio" &
qemu_pid=$!
deadline=$((SECONDS + timeout))
while kill -0 "$qemu_pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        log "timeout after ${timeout}s: killing qemu (pid $qemu_pid); console tail:"
        tail -n 40 "$vm_dir/console.log" >&2
        exit 1
    fi
    sleep 2
done
wait "$qemu_pid" || true
qemu_pid=
log "VM ran $((SECONDS - t_boot)) s (total $((SECONDS - t_start)) s)"

debugfs -R "cat /journal.txt" "$work/payload.raw" >"$vm_dir/journal.txt" 2>/dev/null || true
debugfs -R "cat /results.txt" "$work/payload.raw" >"$work/results.txt" 2>/dev/null || true
if [[ ! -s $work/results.txt ]]; then
    log "no results from the guest; console tail:"
    tail -n 40 "$vm_dir/console.log" >&2
    exit 1
fi
cp "$work/results.txt" "$vm_dir/results.txt"
cat "$work/results.txt"
passes=$(grep -c '^PASS' "$work/results.txt" || true)
fails=$(grep -c '^FAIL' "$work/results.txt" || true)
log "$passes PASS, $fails FAIL (results: $vm_dir/results.txt, guest journal: $vm_dir/journal.txt)"
grep -qx 'exit 0' "$work/results.txt" || die "the guest test did not finish cleanly"
((fails == 0 && passes > 0))
