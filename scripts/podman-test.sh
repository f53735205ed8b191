#!/usr/bin/env bash
# podman-test.sh: prove a union filesystem as the containers-storage overlay backend with the
# real tools (podman, buildah, runc), on an isolated storage root and config, offline.
#
#   scripts/podman-test.sh [--driver layerfs|kernel|fuse-overlayfs] [--layerfs PATH] [--keep]
#   scripts/podman-test.sh --rootless [--driver layerfs|fuse-overlayfs] [--layerfs PATH] [--keep]
#
#   --driver layerfs         mount_program = layerfs (default: `cargo build --release` of this
#                            repo, unless --layerfs PATH names a binary)
#   --driver fuse-overlayfs  mount_program = /usr/bin/fuse-overlayfs (a second reference)
#   --driver kernel          the kernel overlay driver, no mount program (the oracle)
#   --keep                   keep the temp dir (logs, configs, unmounted storage) for a post-mortem
#   --mountopt OPTS          more mount options for every mount (storage.conf mountopt), e.g.
#                            io_uring=off to serve layerfs over /dev/fuse
#   --rootless               podman and buildah run by an unprivileged user it creates, with
#                            fuse-overlayfs and then layerfs as mount program, results compared
#                            (scripts/podman-test-rootless.sh: see there)
#
# Needs root. Installs podman, buildah, runc, skopeo, busybox-static (and fuse3/fuse-overlayfs)
# with apt-get when missing. Never touches /etc, /var/lib/containers or the host's default storage:
# everything lives under one temp dir (/tmp/lfpt.XXXX, short on purpose: runtime socket paths have
# a length limit) that is removed on exit, and the test runs in a private mount namespace where
# /etc, /var and /run are overlays whose upper dirs are in that temp dir (so the tools' stray
# writes, e.g. /var/lib/containers/cache, never reach the host). Prints PASS/FAIL per check, the
# build timings, the argv containers-storage gave the mount program, and "N passed, N failed";
# exits non-zero on a failure.
set -uo pipefail

DRIVER=layerfs
LAYERFS=""
KEEP=0
MOUNTOPT_EXTRA=""
ORIG_ARGS=("$@")
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
for a in "$@"; do
  [ "$a" = --rootless ] && exec bash "$(dirname "$0")/podman-test-rootless.sh" "$@"
done
while [ $# -gt 0 ]; do
  case "$1" in
    --driver) DRIVER="${2:-}"; shift 2 ;;
    --driver=*) DRIVER="${1#*=}"; shift ;;
    --layerfs) LAYERFS="${2:-}"; shift 2 ;;
    --layerfs=*) LAYERFS="${1#*=}"; shift ;;
    --keep) KEEP=1; shift ;;
    --mountopt) MOUNTOPT_EXTRA="${2:-}"; shift 2 ;;
    --mountopt=*) MOUNTOPT_EXTRA="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "podman-test: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$DRIVER" in layerfs|kernel|fuse-overlayfs) ;; *) echo "podman-test: bad --driver: $DRIVER" >&2; exit 2 ;; esac
if [ "$(id -u)" != 0 ]; then echo "podman-test: needs root" >&2; exit 2; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)

# ---------------------------------------------------------------- tools
need=()
for t in podman:podman buildah:buildah runc:runc skopeo:skopeo conmon:conmon docker-registry:docker-registry; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) need+=(busybox-static) ;; esac
if [ "$DRIVER" != kernel ]; then command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3); fi
if [ "$DRIVER" = fuse-overlayfs ]; then [ -x /usr/bin/fuse-overlayfs ] || need+=(fuse-overlayfs); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
    { echo "podman-test: apt-get install ${need[*]} failed" >&2; exit 1; }
fi
if ! case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) true ;; *) false ;; esac; then
  echo "podman-test: /bin/busybox is not the static busybox (install busybox-static)" >&2; exit 1
fi
modprobe overlay 2>/dev/null || true
[ "$DRIVER" = kernel ] || modprobe fuse 2>/dev/null || true

case "$DRIVER" in
  layerfs)
    if [ -z "$LAYERFS" ]; then
      LAYERFS="$REPO/target/release/layerfs"
      if [ "${LFPT_IN_NS:-}" != 1 ]; then
        (cd "$REPO" && cargo build --release -q) || { echo "podman-test: cargo build --release failed" >&2; exit 1; }
      fi
    fi
    [ -x "$LAYERFS" ] || { echo "podman-test: no layerfs binary at $LAYERFS" >&2; exit 1; }
    MP_REAL=$(readlink -f "$LAYERFS") ;;
  fuse-overlayfs) MP_REAL=/usr/bin/fuse-overlayfs ;;
  kernel) MP_REAL="" ;;
esac

# Everything below runs in a private mount namespace, with /etc, /var and /run covered by overlays
# whose upper dirs live under the temp dir: podman 4.3 as root writes its blob-info cache to
# /var/lib/containers/cache and short-name locks to /var/cache/containers whatever its config says,
# and no mount made by the test (container roots, FUSE mounts) is ever visible on the host.
if [ "${LFPT_IN_NS:-}" != 1 ]; then
  export LFPT_IN_NS=1
  exec unshare --mount --propagation private -- bash "$0" "${ORIG_ARGS[@]}"
  echo "podman-test: unshare --mount failed" >&2; exit 1
fi

# ---------------------------------------------------------------- isolated set-up
T=$(mktemp -d /tmp/lfpt.XXXX)
chmod 755 "$T"
for d in etc var run; do
  mkdir -p "$T/ns/$d/u" "$T/ns/$d/w"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/ns/$d/u,workdir=$T/ns/$d/w" "/$d" ||
    { echo "podman-test: cannot cover /$d with an overlay" >&2; rm -rf "$T"; exit 1; }
done
mkdir -p "$T"/{root,run,etc/networks,home/.config/containers,tmp,libpod,logs,w,xdg}
chmod 700 "$T/xdg"
export CONTAINERS_STORAGE_CONF="$T/etc/storage.conf"
export CONTAINERS_CONF="$T/etc/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$T/etc/registries.conf"
export REGISTRY_AUTH_FILE="$T/etc/auth.json"
export HOME="$T/home" XDG_CONFIG_HOME="$T/home/.config" XDG_DATA_HOME="$T/home/.local/share"
export XDG_RUNTIME_DIR="$T/xdg" TMPDIR="$T/tmp"
unset CONTAINER_HOST CONTAINER_CONNECTION DOCKER_HOST BUILDAH_ISOLATION STORAGE_DRIVER STORAGE_OPTS
POLICY="$T/etc/policy.json"
LOG="$T/logs"

# The mount program goes through a shim that records the argv containers-storage passes and the
# exit code, then runs the real program with the same stdio (so a daemon that keeps podman's
# stderr pipe open still hangs podman, as it would without the shim).
MP_LOG="$T/logs/mount-program.log"
if [ -n "$MP_REAL" ]; then
  cat >"$T/mp" <<EOF
#!/bin/bash
by=\$(tr '\\0\\n' '  ' </proc/\$PPID/cmdline 2>/dev/null | cut -c1-120)
echo "argv: \$* [by: \$by]" >>"$MP_LOG"
"$MP_REAL" "\$@"; rc=\$?
echo "rc=\$rc" >>"$MP_LOG"
exit \$rc
EOF
  chmod 755 "$T/mp"
fi

{
  echo '[storage]'
  echo 'driver = "overlay"'
  echo "graphroot = \"$T/root\""
  echo "runroot = \"$T/run\""
  echo '[storage.options]'
  echo 'additionalimagestores = []'
  echo '[storage.options.overlay]'
  echo "mountopt = \"nodev${MOUNTOPT_EXTRA:+,$MOUNTOPT_EXTRA}\""
  [ -n "$MP_REAL" ] && echo "mount_program = \"$T/mp\""
} >"$CONTAINERS_STORAGE_CONF"

# the runtime cannot raise RLIMIT_NOFILE/NPROC above our hard limits (no CAP_SYS_RESOURCE in some
# sandboxes), and podman/buildah would ask for 1048576 by default.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576; [ "$NOFILE" -gt 65536 ] && NOFILE=65536
# (conmon, and so runc, run with at most 32768 processes here, whatever our own limit)
NPROC=$(ulimit -Hu); [ "$NPROC" = unlimited ] && NPROC=4194304; [ "$NPROC" -gt 32768 ] && NPROC=32768
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
netns = "none"
log_driver = "k8s-file"
cgroups = "enabled"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$T/logs/events.log"
tmp_dir = "$T/libpod"
static_dir = "$T/root/libpod"
volume_path = "$T/root/volumes"
image_copy_tmp_dir = "$T/tmp"

[network]
network_backend = "netavark"
network_config_dir = "$T/etc/networks"
default_network = "podman"
EOF
cat >"$CONTAINERS_REGISTRIES_CONF" <<'EOF'
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$POLICY"
cp "$POLICY" "$T/home/.config/containers/policy.json"
echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"

# every podman/buildah call gets a time limit, so that a hung mount cannot hang the test
TMO=${PODMAN_TEST_TIMEOUT:-240}
pm() { timeout -k 10 "$TMO" podman "$@"; }
bh() { timeout -k 10 "$((TMO * 3))" buildah "$@"; }
RUN=(run --pull=never --network=none)

# ---------------------------------------------------------------- clean-up
mounts_under() { # mount points under $1 (deepest first), from our own mount namespace
  awk -v p="$1/" '{ m=$5; gsub(/\\040/, " ", m); if (index(m, p) == 1) print m }' /proc/self/mountinfo | sort -r
}
our_daemons() { # pids of mount-program daemons serving a directory under $T
  local d
  [ -n "$MP_REAL" ] || return 0
  for d in /proc/[0-9]*; do
    [ -r "$d/cmdline" ] || continue
    tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -q -- "^$MP_REAL .*$T/" && echo "${d#/proc/}"
  done
  return 0
}
ns_procs() { # every other process in our private mount namespace: all started by this script
  local d p
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] && continue
    [[ $d/ns/mnt -ef /proc/$$/ns/mnt ]] && echo "$p"
  done
  return 0
}
cleanup() {
  local rc=$? m p left
  trap - EXIT INT TERM
  set +e
  if [ "$KEEP" != 1 ]; then
    timeout 60 podman rm -a -f -t 0 >/dev/null 2>&1
    timeout 60 podman image umount -a -f >/dev/null 2>&1
    timeout 120 podman system reset -f >/dev/null 2>&1
  else
    timeout 60 podman stop -a -t 0 >/dev/null 2>&1
  fi
  for m in $(mounts_under "$T"); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  # wait for what podman left running (conmon's "container cleanup" runs, unmounted daemons), so
  # that nothing of ours outlives the /etc, /var, /run overlays; end any straggler by its pid
  for _ in $(seq 40); do left=$(ns_procs); [ -z "$left" ] && break; sleep 0.25; done
  if [ -n "$left" ]; then
    for p in $left; do echo "podman-test: ending leftover process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-150)" >&2; done
    # shellcheck disable=SC2086,SC2046 # lists of pids
    { kill $left; sleep 1; kill -9 $(ns_procs); } 2>/dev/null
  fi
  umount /run /var /etc 2>/dev/null
  if [ "$KEEP" = 1 ]; then
    echo "kept $T (logs in $LOG; storage in $T/root, unmounted)"
  else
    rm -rf --one-file-system "$T"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "podman-test: interrupted, cleaning up" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- checks
PASS=0 FAIL=0 FAILED=()
check() { # check NAME FUNCTION: run FUNCTION in a subshell with set -e, log to $LOG/NAME.log
  local name=$1 fn=$2 rc
  (set -e; BAD=0; "$fn"; [ "$BAD" = 0 ]) >"$LOG/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    PASS=$((PASS + 1)); echo "PASS $name"
  else
    FAIL=$((FAIL + 1)); FAILED+=("$name"); echo "FAIL $name"
    { grep -E '^(MISMATCH|  [-+])' "$LOG/$name.log" | head -n 30
      grep -vE '^(MISMATCH|  [-+]|Copying |Getting image|Writing manifest|Storing signatures|[0-9a-f]{64}$)' "$LOG/$name.log" | tail -n 6
    } | sed 's/^/    | /'
  fi
}
eq() { # eq WHAT GOT WANT: on a mismatch, print a diff and mark the check failed (it goes on)
  if [ "$2" != "$3" ]; then
    echo "MISMATCH $1 (-want +got):"
    diff -U0 <(printf '%s\n' "$3") <(printf '%s\n' "$2") | grep -v '^@@\|^---\|^+++' | sed 's/^/  /' || true
    BAD=1
  fi
  return 0
}
fails_erofs() { # fails_erofs DESC CMD...: CMD must fail with EROFS ("Read-only file system")
  local err
  if err=$("${@:2}" 2>&1); then echo "MISMATCH $1: succeeded but should have failed"; BAD=1; return 0; fi
  case "$err" in
    *"Read-only file system"*) echo "$1: failed as expected: $err" ;;
    *) echo "MISMATCH $1: failed, but not with EROFS: $err"; BAD=1 ;;
  esac
  return 0
}

# ---------------------------------------------------------------- base image (offline)
# Two layers, loaded from a docker-archive made here: layer 1 is busybox and a first /data, layer 2
# overrides a file, whites one out (.wh.) and makes a directory opaque (.wh..wh..opq), so the
# stacks podman mounts have several lowers in the dialect containers-storage writes.
BIG_LOWER_SUM=""
make_base() {
  local b="$T/base" l1 l2 f
  l1="$b/l1"; l2="$b/l2"
  mkdir -p "$l1"/{bin,etc,dev,proc,sys,run,tmp,root,data/opq} "$l2"/data/{opq,del-dir/sub,re-dir,ren-dir/sub}
  cp /bin/busybox "$l1/bin/busybox"
  for f in $(/bin/busybox --list); do [ "$f" = busybox ] || ln -s busybox "$l1/bin/$f"; done
  chmod 1777 "$l1/tmp"; chmod 700 "$l1/root"
  printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$l1/etc/passwd"
  printf 'root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n' >"$l1/etc/group"
  : >"$l1/etc/hosts"; : >"$l1/etc/resolv.conf"; : >"$l1/etc/hostname"; ln -s ../proc/self/mounts "$l1/etc/mtab"
  echo layer1 >"$l1/data/file.txt"
  echo gone >"$l1/data/gone.txt"
  echo old >"$l1/data/opq/old.txt"

  echo original >"$l2/data/file.txt"; chown 1000:1000 "$l2/data/file.txt"; chmod 640 "$l2/data/file.txt"
  : >"$l2/data/.wh.gone.txt"
  : >"$l2/data/opq/.wh..wh..opq"; echo new >"$l2/data/opq/new.txt"
  echo meta >"$l2/data/meta.txt"
  echo del >"$l2/data/del-file"
  echo a >"$l2/data/del-dir/a"; echo c >"$l2/data/del-dir/sub/c"
  echo re-old >"$l2/data/re-file"
  echo old1 >"$l2/data/re-dir/old1"; echo old2 >"$l2/data/re-dir/old2"
  echo ren >"$l2/data/ren-file"
  echo x >"$l2/data/ren-dir/x"; echo y >"$l2/data/ren-dir/sub/y"
  echo hard >"$l2/data/hl1"; ln "$l2/data/hl1" "$l2/data/hl2"
  echo hl-src >"$l2/data/hl-src"
  echo iso >"$l2/data/iso.txt"
  head -c 8388608 /dev/urandom >"$l2/data/big-lower"
  BIG_LOWER_SUM=$(sha256sum <"$l2/data/big-lower" | cut -d' ' -f1)
  echo "$BIG_LOWER_SUM" >"$T/w/big-lower.sum"

  mkdir -p "$b/arch"
  local ids=() n=0
  for f in l1 l2; do
    tar --numeric-owner --sort=name --mtime=@1700000000 -C "$b/$f" -cf "$b/arch/$f.tar" .
    ids+=("sha256:$(sha256sum <"$b/arch/$f.tar" | cut -d' ' -f1)")
  done
  printf '{"architecture":"amd64","os":"linux","created":"2023-11-14T22:13:20Z","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s","%s"]},"history":[{"created":"2023-11-14T22:13:20Z","created_by":"busybox-static"},{"created":"2023-11-14T22:13:20Z","created_by":"test fixtures"}]}' \
    "${ids[0]}" "${ids[1]}" >"$b/arch/config.json"
  printf '[{"Config":"config.json","RepoTags":["localhost/lfbase:latest"],"Layers":["l1.tar","l2.tar"]}]' >"$b/arch/manifest.json"
  tar -C "$b/arch" -cf "$b/base.tar" manifest.json config.json l1.tar l2.tar
  pm load -i "$b/base.tar"
  pm image inspect --format '{{.Id}} {{len .RootFS.Layers}} layers' localhost/lfbase
  rm -rf "$b"
}

# ---------------------------------------------------------------- the checks
c_image_read() {
  local out
  out=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c '
    cat /data/file.txt; ls /data/opq; test ! -e /data/gone.txt && echo no-gone
    stat -c "%a %u:%g" /data/file.txt; sha256sum /data/big-lower | cut -d" " -f1
    ls /data | tr "\n" " "')
  eq "image view" "$out" "original
new.txt
no-gone
640 1000:1000
$BIG_LOWER_SUM
big-lower del-dir del-file file.txt hl-src hl1 hl2 iso.txt meta.txt opq re-dir re-file ren-dir ren-file "
}

c_rootfs_flags() { # the container's / must allow setuid programs (no nosuid), as with the kernel driver
  local line flags
  line=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c 'grep " / / " /proc/self/mountinfo')
  echo "container / : $line"
  flags=$(printf '%s\n' "$line" | cut -d' ' -f6)
  case ",$flags," in *,nosuid,*) eq "mount flags of the container's /" "$flags" "(no nosuid)" ;; esac
  eq "container / mounted read-write" "$(case ",$flags," in *,rw,*) echo rw ;; *) echo "$flags" ;; esac)" rw
}

c_run_rw() {
  local out
  out=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c '
    cat /data/file.txt; echo hello >/tmp/new; echo more >>/tmp/new; cat /tmp/new
    mkdir -p /tmp/d/e; echo deep >/tmp/d/e/f; cat /tmp/d/e/f; ls /tmp/d/e')
  eq "run output" "$out" "original
hello
more
deep
f"
}

# One long-lived container, "main", accumulates changes that diff/commit/export/stop-start check.
c_main_start() {
  pm "${RUN[@]}" -d --name main localhost/lfbase sleep 1000000
  pm exec main cat /data/file.txt
}
mx() { pm exec "$@"; }

c_copy_up() {
  local out
  out=$(mx main sh -c 'echo modified >>/data/file.txt && cat /data/file.txt && stat -c "%a %u:%g %s" /data/file.txt
                      chmod 600 /data/meta.txt && stat -c "%a" /data/meta.txt && cat /data/meta.txt
                      echo x >>/data/big-lower && stat -c %s /data/big-lower')
  eq "copied-up file" "$out" "original
modified
640 1000:1000 18
600
meta
8388610"
  out=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c 'cat /data/file.txt; stat -c %a /data/meta.txt; sha256sum /data/big-lower | cut -d" " -f1')
  eq "another container of the image" "$out" "original
644
$BIG_LOWER_SUM"
}

c_whiteouts() {
  local out
  # re-dir/old1 is looked up right after the re-creation, before any readdir of the new directory;
  # re-dir/old2 is left alone here, so that diff and commit are the first to ask for it.
  out=$(mx main sh -c 'rm /data/del-file && rm -r /data/del-dir && rm /data/re-file && rm -r /data/re-dir
    for p in del-file del-dir del-dir/a re-file re-dir re-dir/old1; do test -e /data/$p && echo "still there: $p"; done
    ls /data | grep -E "^(del|re)-" ; echo ---
    echo re-new >/data/re-file && mkdir /data/re-dir && echo n >/data/re-dir/new
    test -e /data/re-dir/old1 && echo "old child visible in the re-created directory: re-dir/old1"
    cat /data/re-file; ls -A /data/re-dir; ls -d /data/del-* 2>&1 | grep -c "No such"')
  eq "after delete and re-create" "$out" "---
re-new
new
1"
}

c_rename() {
  local out
  out=$(mx main sh -c 'mv /data/ren-file /data/ren-file2 && mv /data/ren-dir /data/ren-dir2
    cat /data/ren-file2; cat /data/ren-dir2/x /data/ren-dir2/sub/y
    test -e /data/ren-file && echo old-file-left; test -e /data/ren-dir && echo old-dir-left
    echo ren >/data/r1 && mv /data/r1 /data/r2 && cat /data/r2 && test ! -e /data/r1 && echo r1-gone && rm /data/r2')
  eq "after rename" "$out" "ren
x
y
ren
r1-gone"
}

c_hardlinks() {
  local out
  out=$(mx main sh -c '
    stat -c %h /data/hl1; test "$(stat -c %i /data/hl1)" = "$(stat -c %i /data/hl2)" && echo same-ino-in-image
    ln /data/hl-src /data/hl-new && stat -c %h /data/hl-src /data/hl-new
    test "$(stat -c %i /data/hl-src)" = "$(stat -c %i /data/hl-new)" && echo same-ino
    echo via-new >>/data/hl-new && cat /data/hl-src
    echo t >/data/th1 && ln /data/th1 /data/th2 && echo t2 >>/data/th2 && stat -c %h /data/th1 && cat /data/th1
    rm /data/th1 && stat -c %h /data/th2 && rm /data/th2')
  eq "hard links" "$out" "2
same-ino-in-image
2
2
same-ino
hl-src
via-new
2
t
t2
1"
}

c_fifo() {
  local out
  out=$(mx main sh -c 'mkfifo /data/fifo && stat -c %F /data/fifo && (echo ping >/data/fifo &) && cat /data/fifo')
  eq "fifo" "$out" "fifo
ping"
}

BIG_SUM=""
c_big_file() {
  local out
  head -c 8388608 /dev/urandom >"$T/w/big8"
  BIG_SUM=$(sha256sum <"$T/w/big8" | cut -d' ' -f1)
  echo "$BIG_SUM" >"$T/w/big8.sum"
  pm exec -i main sh -c 'cat >/data/big8' <"$T/w/big8"
  out=$(mx main sh -c 'stat -c %s /data/big8; sha256sum /data/big8 | cut -d" " -f1')
  eq "8 MiB file in the container" "$out" "8388608
$BIG_SUM"
  out=$(mx main cat /data/big8 | sha256sum | cut -d' ' -f1)
  eq "8 MiB file read back on the host" "$out" "$BIG_SUM"
}

# podman diff / commit are computed one of two ways by containers-storage, both exact: with the
# kernel driver from the upper dir ("Native Overlay Diff": a re-created directory is one opaque
# directory, "D dir" plus its new children), with a mount_program by walking the mounted container
# and its parent image side by side ("naive diff": a re-created directory is "C dir" plus a "D" for
# each old child). NATIVE_DIFF (true/false) is read from podman info.
NATIVE_DIFF=""
expected_diff() {
  {
    printf '%s\n' "A /data/big8" "A /data/fifo" "A /data/hl-new" "A /data/re-dir/new" "A /data/ren-dir2" \
      "A /data/ren-dir2/sub" "A /data/ren-dir2/sub/y" "A /data/ren-dir2/x" "A /data/ren-file2" "C /data" \
      "C /data/big-lower" "C /data/file.txt" "C /data/hl-src" "C /data/meta.txt" "C /data/re-file" \
      "D /data/del-dir" "D /data/del-file" "D /data/ren-dir" "D /data/ren-file"
    if [ "$NATIVE_DIFF" = true ]; then
      echo "D /data/re-dir"
    else
      printf '%s\n' "C /data/re-dir" "D /data/re-dir/old1" "D /data/re-dir/old2"
    fi
  } | sort
}
expected_layer_whiteouts() {
  {
    printf '%s\n' data/.wh.del-dir data/.wh.del-file data/.wh.ren-dir data/.wh.ren-file
    if [ "$NATIVE_DIFF" = true ]; then
      echo data/re-dir/.wh..wh..opq
    else
      printf '%s\n' data/re-dir/.wh.old1 data/re-dir/.wh.old2
    fi
  } | sort
}
c_diff() {
  local out
  out=$(pm container diff main | sort)
  eq "podman diff main (native diff: $NATIVE_DIFF)" "$out" "$(expected_diff)"
}

MAIN_VIEW='cat /data/file.txt /data/re-file /data/ren-file2 /data/hl-src; stat -c %a /data/meta.txt
  ls /data | tr "\n" " "; echo; ls -A /data/re-dir /data/ren-dir2 | tr "\n" " "; echo
  stat -c %h /data/hl-new; stat -c %F /data/fifo; sha256sum /data/big8 | cut -d" " -f1'
main_view_want() {
  printf '%s\n' original modified re-new ren hl-src via-new 600 \
    "big-lower big8 fifo file.txt hl-new hl-src hl1 hl2 iso.txt meta.txt opq re-dir re-file ren-dir2 ren-file2 " \
    "/data/re-dir: new  /data/ren-dir2: sub x " 2 fifo "$BIG_SUM"
}
c_stop_start() {
  local out before inos inos2
  local ino_cmd='stat -c "%n %i" /data/file.txt /data/hl1 /data/hl2 /data/big8 /data/ren-dir2 /data/re-dir'
  before=$(mx main sh -c "$MAIN_VIEW")
  eq "view before stop" "$before" "$(main_view_want)"
  inos=$(mx main sh -c "$ino_cmd")
  pm stop -t 0 main
  eq "state after stop" "$(pm container inspect --format '{{.State.Status}}' main)" exited
  pm start main
  out=$(mx main sh -c "$MAIN_VIEW")
  eq "view after start" "$out" "$(main_view_want)"
  inos2=$(mx main sh -c "$ino_cmd")
  eq "inode numbers across stop/start (copied-up, lower, hard-linked, new, renamed, re-created)" "$inos2" "$inos"
}

c_commit() {
  local last tarf list wh
  pm commit -q main localhost/lfcommit
  rm -rf "$T/w/oci"
  pm save --format oci-dir --uncompressed -o "$T/w/oci" localhost/lfcommit
  last=$(pm image inspect --format '{{range .RootFS.Layers}}{{println .}}{{end}}' localhost/lfcommit | grep . | tail -1)
  tarf="$T/w/layer.tar"
  for f in "$T"/w/oci/blobs/sha256/*; do # the layer whose uncompressed digest is the last diffID
    zcat -f "$f" >"$tarf"
    [ "sha256:$(sha256sum <"$tarf" | cut -d' ' -f1)" = "$last" ] && break
    rm -f "$tarf"
  done
  [ -f "$tarf" ] || { echo "no blob with the committed layer's diffID $last"; ls "$T/w/oci/blobs/sha256"; return 1; }
  list=$(tar -tf "$tarf" | sed 's#^\./##; s#/$##' | grep -v '^\.\?$' | sort || true)
  printf '%s\n' "$list" >"$T/w/commit-layer.txt"
  wh=$(printf '%s\n' "$list" | grep '\.wh\.' | sort || true)
  eq "whiteout entries in the committed layer (native diff: $NATIVE_DIFF)" "$wh" "$(expected_layer_whiteouts)"
  eq "all entries in the committed layer" "$(printf '%s\n' "$list" | grep -v '\.wh\.' | grep -v '^etc\|^run\|^proc\|^dev\|^sys' || true)" \
    "data
data/big-lower
data/big8
data/fifo
data/file.txt
data/hl-new
data/hl-src
data/meta.txt
data/re-dir
data/re-dir/new
data/re-file
data/ren-dir2
data/ren-dir2/sub
data/ren-dir2/sub/y
data/ren-dir2/x
data/ren-file2"
  # overlay-private xattrs must never leak into a layer (they travel as PAX SCHILY.xattr records)
  if grep -a -o 'SCHILY\.xattr\.[a-z]*\.[a-z]*overlay[a-z.]*' "$tarf" | sort -u | grep .; then
    echo "private overlay xattrs in the committed layer"; return 1
  fi
  eq "hard link kept in the layer" "$(tar -tvf "$tarf" | grep -c 'data/hl-new link to\|data/hl-src link to')" 1
  eq "view of the committed image" "$(pm "${RUN[@]}" --rm localhost/lfcommit sh -c "$MAIN_VIEW")" "$(main_view_want)"
}

c_export() {
  local x="$T/w/export"
  rm -rf "$x"; mkdir -p "$x"
  pm export -o "$T/w/export.tar" main
  if tar -tf "$T/w/export.tar" | grep '\.wh\.'; then echo "whiteouts in an export"; return 1; fi
  tar -C "$x" -xf "$T/w/export.tar"
  eq "exported file.txt" "$(cat "$x/data/file.txt")" "original
modified"
  eq "exported /data" "$(ls "$x/data" | tr '\n' ' ')" \
    "big-lower big8 fifo file.txt hl-new hl-src hl1 hl2 iso.txt meta.txt opq re-dir re-file ren-dir2 ren-file2 "
  eq "exported re-dir" "$(ls -A "$x/data/re-dir")" new
  eq "exported opq" "$(ls -A "$x/data/opq")" new.txt
  eq "exported big8" "$(sha256sum <"$x/data/big8" | cut -d' ' -f1)" "$BIG_SUM"
  eq "exported big-lower size" "$(stat -c %s "$x/data/big-lower")" 8388610
  eq "exported meta mode" "$(stat -c %a "$x/data/meta.txt")" 600
  eq "exported fifo" "$(stat -c %F "$x/data/fifo")" fifo
  eq "exported hard link" "$(stat -c %h "$x/data/hl-new")" 2
  eq "exported busybox" "$(cmp "$x/bin/busybox" /bin/busybox && echo same)" same
}

c_isolation() {
  pm "${RUN[@]}" -d --name iso-a localhost/lfbase sleep 1000000
  pm "${RUN[@]}" -d --name iso-b localhost/lfbase sleep 1000000
  mx iso-a sh -c 'echo A >/data/iso.txt; echo a >/data/only-a; rm /data/hl1; mkdir /data/dir-a'
  mx iso-b sh -c 'echo B >>/data/iso.txt; rm /data/meta.txt'
  eq "seen in iso-a" "$(mx iso-a sh -c 'cat /data/iso.txt; ls /data | tr "\n" " "')" "A
big-lower del-dir del-file dir-a file.txt hl-src hl2 iso.txt meta.txt only-a opq re-dir re-file ren-dir ren-file "
  eq "seen in iso-b" "$(mx iso-b sh -c 'cat /data/iso.txt; ls /data | tr "\n" " "')" "iso
B
big-lower del-dir del-file file.txt hl-src hl1 hl2 iso.txt opq re-dir re-file ren-dir ren-file "
  eq "diff iso-a" "$(pm container diff iso-a | sort | tr '\n' ' ')" "A /data/dir-a A /data/only-a C /data C /data/iso.txt D /data/hl1 "
  eq "diff iso-b" "$(pm container diff iso-b | sort | tr '\n' ' ')" "C /data C /data/iso.txt D /data/meta.txt "
  pm rm -f -t 0 iso-a iso-b
}

c_image_mount_ro() {
  local mnt
  mnt=$(pm image mount localhost/lfbase)
  echo "image mounted at $mnt"
  grep " $mnt " /proc/self/mountinfo || echo "no mount at $mnt in /proc/self/mountinfo"
  eq "read through the image mount" "$(cat "$mnt/data/file.txt"; ls "$mnt/data/opq")" "original
new.txt"
  fails_erofs "create in the image mount" touch "$mnt/data/new-file"
  fails_erofs "write to an image file" sh -c "echo x >>'$mnt/data/file.txt'"
  fails_erofs "remove an image file" rm "$mnt/data/iso.txt"
  fails_erofs "mkdir in the image mount" mkdir "$mnt/newdir"
  fails_erofs "chmod in the image mount" chmod 600 "$mnt/data/file.txt"
  eq "image file unchanged" "$(cat "$mnt/data/file.txt")" original
  pm image umount localhost/lfbase
  if grep -q " $mnt " /proc/self/mountinfo; then echo "still mounted: $mnt"; return 1; fi
}

BUILD1=""; BUILD2=""
c_build_cache() {
  local ctx="$T/w/ctx" id1 id2 t0 t1 t2 n
  mkdir -p "$ctx/payload"
  echo one >"$ctx/payload/one"; head -c 1048576 /dev/urandom >"$ctx/payload/rand"
  cat >"$ctx/Containerfile" <<'EOF'
FROM localhost/lfbase
RUN echo step1 >/data/built.txt && rm /data/del-file && rm -r /data/ren-dir && mkdir -p /opt/x && echo more >>/data/file.txt
COPY payload /opt/payload
RUN cat /opt/payload/one /data/built.txt >/opt/all && ls /data >/opt/list && sha256sum /opt/payload/rand >/opt/rand.sum
EOF
  local bud=(bud --layers --force-rm --pull=never --network=none --signature-policy "$POLICY" --isolation oci -f "$ctx/Containerfile" -t localhost/lfbuilt "$ctx")
  t0=$(date +%s.%N)
  bh "${bud[@]}" 2>&1 | tee "$T/w/build1.out"
  t1=$(date +%s.%N)
  id1=$(pm image inspect --format '{{.Id}}' localhost/lfbuilt)
  bh "${bud[@]}" 2>&1 | tee "$T/w/build2.out"
  t2=$(date +%s.%N)
  id2=$(pm image inspect --format '{{.Id}}' localhost/lfbuilt)
  BUILD1=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  BUILD2=$(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}')
  echo "build timings: first ${BUILD1}s, cached ${BUILD2}s" >"$T/w/timings"
  eq "image id of the cached build" "$id2" "$id1"
  n=$(grep -c 'Using cache' "$T/w/build2.out" || true)
  eq "cache hits in the second build (steps 2-4)" "$n" 3
  n=$(grep -c 'Using cache' "$T/w/build1.out" || true)
  eq "cache hits in the first build" "$n" 0
  eq "layers of the built image" "$(pm image inspect --format '{{len .RootFS.Layers}}' localhost/lfbuilt)" 5
  eq "view of the built image" "$(pm "${RUN[@]}" --rm localhost/lfbuilt sh -c '
      cat /opt/all /data/file.txt; tr "\n" " " </opt/list; echo; cut -d" " -f1 /opt/rand.sum
      test -e /data/ren-dir || echo ren-dir-gone; ls -d /opt/x')" "one
step1
original
more
big-lower built.txt del-dir file.txt hl-src hl1 hl2 iso.txt meta.txt opq re-dir re-file ren-file 
$(sha256sum <"$ctx/payload/rand" | cut -d' ' -f1)
ren-dir-gone
/opt/x"
}

# An image `layerfs build` made runs under podman as it runs under `layerfs run`: the store is
# an OCI layout, so skopeo copies it into containers-storage as it is.
c_layerfs_built_image() {
  local lf="$LAYERFS" st="$T/lfstore" ctx="$T/w/lfctx" want got
  mkdir -p "$ctx/src"
  skopeo copy --quiet containers-storage:localhost/lfbase oci:"$T/w/lfbase-oci":base
  "$lf" --root "$st" import --oci "$T/w/lfbase-oci":base --name lfbase >/dev/null
  echo 'built by layerfs' >"$ctx/src/msg"
  printf '%s\n' 'FROM lfbase' 'WORKDIR /srv' 'COPY src/ ./' \
    "RUN sed 's/^/from a RUN step: /' msg >out && rm /data/file.txt && chown 1000:1000 out" \
    'ENV GREETING=hi' 'USER user' \
    'CMD ["sh", "-c", "cat /srv/msg /srv/out; echo $GREETING $(id -u) $(pwd); ls /data | head -3; stat -c %u:%g /srv/out"]' \
    >"$ctx/Containerfile"
  "$lf" --root "$st" build -q -t lfapp "$ctx"
  want=$("$lf" --root "$st" run --rm lfapp)
  echo "layerfs run: $want"
  skopeo copy --quiet oci:"$st":lfapp containers-storage:localhost/lfapp
  got=$(pm "${RUN[@]}" --rm localhost/lfapp)
  eq "podman run of the image layerfs built (vs layerfs run)" "$got" "$want"
  eq "what the image holds" "$want" "built by layerfs
from a RUN step: built by layerfs
hi 1000 /srv
big-lower
del-dir
del-file
1000:1000"
}

# Registries both ways with the real distribution server: podman pulls and runs what
# `layerfs push` sent, and `layerfs pull` takes what `podman push` sent (after
# c_layerfs_built_image, which made $T/lfstore and its lfapp image).
c_registry_interop() {
  local lf="$LAYERFS" st="$T/lfstore" port want got back
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$T/w/registry" "$port" >"$T/w/registry.yml"
  # (the server reads REGISTRY_* variables as its configuration: not podman's auth file)
  env -u REGISTRY_AUTH_FILE docker-registry serve "$T/w/registry.yml" >"$LOG/registry.log" 2>&1 &
  REGISTRY_PID=$!
  # this check runs in its own subshell: the server goes with it, however it ends
  trap 'kill "$REGISTRY_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  want=$("$lf" --root "$st" run --rm lfapp)
  "$lf" --root "$st" push lfapp "localhost:$port/lf/app:1" --tls-verify=false
  pm pull -q --tls-verify=false "localhost:$port/lf/app:1"
  got=$(pm "${RUN[@]}" --rm "localhost:$port/lf/app:1")
  eq "podman run of what layerfs pushed" "$got" "$want"
  pm push -q --tls-verify=false localhost/lfbase "localhost:$port/lf/base:1"
  "$lf" --root "$st" pull "localhost:$port/lf/base:1" --tls-verify=false --name pulled-base
  back=$("$lf" --root "$st" run --rm pulled-base sh -c 'cat /data/file.txt; ls /data/opq; stat -c "%a %u:%g" /data/file.txt')
  eq "layerfs run of what podman pushed" "$back" "original
new.txt
640 1000:1000"
  kill "$REGISTRY_PID"; wait "$REGISTRY_PID" 2>/dev/null || true
  return 0
}

fuse_mounts_under_root() {
  awk -v p="$T/root/" '{ m=$5; for (i = 7; $i != "-"; i++); t=$(i+1); if (index(m, p) == 1 && (t ~ /^fuse/ || t == "overlay")) print t, m }' /proc/self/mountinfo
}
c_no_mounts_left() {
  pm rm -a -f -t 0
  pm image umount -a
  local left procs
  left=$(fuse_mounts_under_root)
  eq "overlay/fuse mounts under the storage root" "$left" ""
  sleep 1
  procs=$(for p in $(our_daemons); do tr '\0' ' ' <"/proc/$p/cmdline"; echo; done)
  eq "mount-program daemons still running" "$procs" ""
}

# ---------------------------------------------------------------- run
echo "podman-test: driver=$DRIVER${MP_REAL:+ mount_program=$MP_REAL} root=$T"
echo "podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), $(runc --version | head -1)"
START=$(date +%s)
(set -e; make_base) >"$LOG/base.log" 2>&1
if [ $? != 0 ]; then
  echo "FAIL base-image (podman load of the busybox image)"; tail -n 15 "$LOG/base.log" | sed 's/^/    | /'
  echo "0 passed, 1 failed"
  exit 1
fi
BIG_LOWER_SUM=$(cat "$T/w/big-lower.sum")
NATIVE_DIFF=$(pm info --format '{{index .Store.GraphStatus "Native Overlay Diff"}}' 2>/dev/null)
echo "containers-storage: Native Overlay Diff = ${NATIVE_DIFF:-?}"
check image-read c_image_read
check run-read-write c_run_rw
check rootfs-suid-allowed c_rootfs_flags
check main-container c_main_start
check copy-up c_copy_up
check whiteouts-recreate c_whiteouts
check rename c_rename
check hard-links c_hardlinks
check fifo c_fifo
check big-file-8MiB c_big_file
BIG_SUM=$(cat "$T/w/big8.sum" 2>/dev/null || true)
check diff c_diff
check stop-start c_stop_start
check commit-whiteouts c_commit
check export c_export
check isolation c_isolation
check image-mount-ro c_image_mount_ro
check build-cache c_build_cache
[ "$DRIVER" = layerfs ] && check layerfs-built-image-under-podman c_layerfs_built_image
[ "$DRIVER" = layerfs ] && check registry-podman-layerfs c_registry_interop
check no-mounts-left c_no_mounts_left

[ -f "$T/w/timings" ] && cat "$T/w/timings"
if [ -s "$MP_LOG" ]; then
  echo "mount program calls (distinct argv shapes; L = a T/root/overlay/l/ layer link, ID = a layer id):"
  grep '^argv:' "$MP_LOG" | sed -E -e "s#$T#T#g" -e 's#T/root/overlay/l/[A-Z0-9]{26}#L#g' -e 's#[0-9a-f]{64}#ID#g' \
    -e 's#\[by: (podman|buildah) (--?[^ ]+ )*([a-z]+)( (mount|umount))?.*\]$#[\1 \3\4]#' |
    sort | uniq -c | sort -rn | head -n 16 | sed 's/^/    /'
  echo "    exit codes: $(grep '^rc=' "$MP_LOG" | sort | uniq -c | tr -s ' \n' '  ')"
fi
echo "total time: $(( $(date +%s) - START ))s"
[ ${#FAILED[@]} -gt 0 ] && echo "failed: ${FAILED[*]}"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
