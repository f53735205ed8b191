#!/usr/bin/env bash
# POSIX conformance (pjdfstest) on a 2-lower stack with an upper.
#
#   scripts/pjdfstest.sh [--driver layerfs|kernel|fuse-overlayfs] [--layerfs BIN] [--min N] [MOUNTPOINT]
#
# Installs pjdfstest with cargo when missing, builds the stack in a temp dir, mounts it at
# MOUNTPOINT (default: inside the temp dir), runs the suite there and prints
# "N passed, N failed, N skipped" plus every failing test with its reason. Exits 1 when fewer
# than --min tests pass (default 0: report only). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

driver=layerfs
bin=
min=0
mnt=
while [ $# -gt 0 ]; do
  case "$1" in
    --driver) driver=$2; shift 2 ;;
    --layerfs) bin=$2; shift 2 ;;
    --min) min=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) mnt=$1; shift ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "pjdfstest.sh: needs root" >&2; exit 1; }

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v pjdfstest >/dev/null 2>&1; then
  echo "installing pjdfstest (cargo install pjdfstest@0.2.2)"
  cargo install --quiet --locked pjdfstest@0.2.2
fi
if [ "$driver" = layerfs ] && [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=$repo/target/release/layerfs
fi
if [ "$driver" = fuse-overlayfs ] && ! command -v fuse-overlayfs >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse-overlayfs >/dev/null
fi

tmp=$(mktemp -d /var/tmp/lfpj.XXXXXX)
chmod 755 "$tmp"  # the suite switches to unprivileged users, who must reach the mount
mnt=${mnt:-$tmp/m}
mkdir -p "$tmp"/{l1,l2,u,w} "$mnt"
cleanup() {
  cd /
  if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Something in both lowers, so the suite runs inside a merged directory.
echo bottom >"$tmp/l2/bottom"
mkdir -p "$tmp/l2/shared" "$tmp/l1/shared"
echo top >"$tmp/l1/top"

case "$driver" in
  layerfs)
    "$bin" mount --lower "$tmp/l1" --lower "$tmp/l2" --upper "$tmp/u" --work "$tmp/w" "$mnt" -o suid,dev ;;
  kernel)
    mount -t overlay overlay -o "lowerdir=$tmp/l1:$tmp/l2,upperdir=$tmp/u,workdir=$tmp/w" "$mnt" ;;
  fuse-overlayfs)
    fuse-overlayfs -o "lowerdir=$tmp/l1:$tmp/l2,upperdir=$tmp/u,workdir=$tmp/w,allow_other,default_permissions,suid,dev" "$mnt" ;;
  *) echo "unknown driver $driver" >&2; exit 2 ;;
esac

# Two unprivileged accounts every Debian system has.
cat >"$tmp/pjdfstest.toml" <<'EOF'
[features]
posix_fallocate = {}
rename_ctime = {}
[settings]
naptime = 0.001
allow_remount = false
[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
EOF

work="$mnt/shared/pjd"
mkdir -p "$work"
log=$tmp/pjdfstest.log
(cd "$work" && RUST_BACKTRACE=0 pjdfstest -c "$tmp/pjdfstest.toml" -p "$work" >"$log" 2>&1) || true

summary=$(grep -E '^Summary:' "$log" | tail -1)
if [ -z "$summary" ]; then
  echo "pjdfstest did not finish; last output:" >&2
  tail -20 "$log" >&2
  exit 1
fi
passed=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$summary")
failed=$(sed -E 's/^Summary: ([0-9]+) failed.*/\1/' <<<"$summary")
skipped=$(sed -E 's/.* ([0-9]+) skipped.*/\1/' <<<"$summary")
echo "driver $driver: $summary"
echo "failures (test: reason):"
awk '/FAILED$/ {name=$1; getline; sub(/^[ \t]+/, ""); print "  " name ": " $0}' "$log" | sort
echo "$passed passed, $failed failed, $skipped skipped"
[ "$passed" -ge "$min" ]
