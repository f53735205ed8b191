#!/usr/bin/env bash
# The main job, end to end, on the default store (/var/lib/layerfs as root, or $LAYERFS_ROOT):
# build a small base image from busybox, mount it as a container, change files in it, commit
# the changes as a new image, show the history, and mount the new image.
#
#   bash scripts/demo.sh
#
# Needs root (FUSE mounts and chroot). Installs fuse3 and busybox-static when missing. The
# images it makes (demo/base, demo/app) stay in the store; its container is removed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it mounts and chroots)" >&2; exit 1; }
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
lfs=$PWD/target/release/layerfs

work=$(mktemp -d /tmp/layerfs-demo.XXXXXX)
container=demo-$$
cleanup() {
  for m in "$work/mnt" "$work/mnt2"; do
    if mountpoint -q "$m" 2>/dev/null; then "$lfs" umount "$m" || umount -l "$m"; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A base root filesystem: busybox and a few files"
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,root}
cp /bin/busybox "$rootfs/bin/"
for app in sh ls cat echo rm mkdir mv ln; do ln -s busybox "$rootfs/bin/$app"; done
echo "root:x:0:0:root:/root:/bin/sh" >"$rootfs/etc/passwd"
echo "Welcome to the layerfs demo base image" >"$rootfs/etc/motd"
echo "demo 1.0" >"$rootfs/etc/issue"
ls -l "$rootfs" "$rootfs/etc"

step "2. Turn it into an OCI layer and import it as image demo/base"
"$lfs" diff "$rootfs" -o "$work/base.tar"
"$lfs" import "$work/base.tar" --name demo/base

step "3. Mount demo/base as container $container"
mkdir -p "$work/mnt"
"$lfs" mount --image demo/base --container "$container" "$work/mnt"
grep " $work/mnt " /proc/self/mountinfo

step "4. Change files inside the container"
chroot "$work/mnt" /bin/sh -c '
  echo "Hello from a container running on layerfs" > /etc/motd
  rm /etc/issue
  mkdir /app && echo "echo hello from /app" > /app/run.sh
  mv /root /home
  ls -l / /etc /app'

step "5. Unmount and commit the container as image demo/app"
"$lfs" umount "$work/mnt"
"$lfs" commit --container "$container" --from demo/base --name demo/app \
  --message "demo: new motd, /app, /etc/issue removed, /root moved to /home"

step "6. What the store holds"
"$lfs" images
"$lfs" history demo/app

step "7. Mount the committed image: the changes are in it"
mkdir -p "$work/mnt2"
"$lfs" mount --image demo/app "$work/mnt2"
cat "$work/mnt2/etc/motd"
ls "$work/mnt2" "$work/mnt2/etc"
"$lfs" umount "$work/mnt2"

step "8. Remove the demo container (images demo/base and demo/app stay)"
"$lfs" rm --container "$container"
echo "done: try '$lfs history demo/app' or '$lfs mount --image demo/app DIR'"
