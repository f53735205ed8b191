#!/usr/bin/env bash
# podman-test-rootless.sh: the --rootless mode of scripts/podman-test.sh (which runs this file when
# given --rootless): podman and buildah run by an unprivileged user, with a FUSE mount program as
# the overlay backend, under the user's own subordinate ids, for each of two mount programs in
# turn, and every result compared.
#
#   scripts/podman-test.sh --rootless [--driver layerfs|fuse-overlayfs] [--layerfs PATH] [--keep]
#
#   --driver layerfs         (default) run every check with /usr/bin/fuse-overlayfs (the
#                            reference) and then with layerfs; a layerfs check passes when it
#                            gives what we expect and exactly what fuse-overlayfs gave
#   --driver fuse-overlayfs  the reference alone (to check the test itself)
#   --layerfs PATH           the layerfs binary (default: `cargo build --release` of this repo)
#   --keep                   keep the temp dir (logs, configs, storage) for a post-mortem
#
# Needs root, and changes nothing on the host but a temp dir (/tmp/lfpr.XXXX, removed on exit):
# it runs in private mount and PID namespaces where /etc, /var and /run are overlays whose upper
# dirs are in the temp dir. There it creates the user lfpt-rootless (unless it exists; uid and gid
# the first free id from 2000 up, so that they differ from the image's user 1000) with
# subordinate ids in /etc/subuid and /etc/subgid, and binds over /dev/fuse a device node of mode
# 0666 (stock distros ship that mode; rootless mounts need it), so the host's users, subordinate
# ids and /dev/fuse never change. Every process the test starts lives in its PID namespace: at
# exit the left-overs are ended by pid, and the kernel ends any the script missed when it exits.
# Prints PASS/FAIL per check and mount program, the mount programs' argv (the uidmapping= and
# gidmapping= values containers-storage passed, per check) and "N passed, N failed"; exits
# non-zero on a failure.
set -uo pipefail

DRIVER=layerfs
LAYERFS=""
KEEP=0
ORIG_ARGS=("$@")
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rootless) shift ;;
    --driver) DRIVER="${2:-}"; shift 2 ;;
    --driver=*) DRIVER="${1#*=}"; shift ;;
    --layerfs) LAYERFS="${2:-}"; shift 2 ;;
    --layerfs=*) LAYERFS="${1#*=}"; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "podman-test: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$DRIVER" in
  layerfs|fuse-overlayfs) ;;
  kernel) echo "podman-test: --rootless compares mount programs: --driver layerfs or fuse-overlayfs" >&2; exit 2 ;;
  *) echo "podman-test: bad --driver: $DRIVER" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then echo "podman-test: needs root (it runs podman as a user it creates)" >&2; exit 2; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
USER_NAME=lfpt-rootless

# ---------------------------------------------------------------- tools
if [ "${LFPT_IN_NS:-}" != 1 ]; then
  need=()
  for t in podman:podman buildah:buildah runc:runc conmon:conmon newuidmap:uidmap newgidmap:uidmap \
    fusermount3:fuse3 setpriv:util-linux useradd:passwd; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
  done
  [ -x /usr/bin/fuse-overlayfs ] || need+=(fuse-overlayfs)
  case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) need+=(busybox-static) ;; esac
  if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "installing: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
      { echo "podman-test: apt-get install ${need[*]} failed" >&2; exit 1; }
  fi
  if ! case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) true ;; *) false ;; esac; then
    echo "podman-test: /bin/busybox is not the static busybox (install busybox-static)" >&2; exit 1
  fi
  modprobe fuse 2>/dev/null || true
  modprobe overlay 2>/dev/null || true
  if [ "$DRIVER" = layerfs ] && [ -z "$LAYERFS" ]; then
    (cd "$REPO" && cargo build --release -q) || { echo "podman-test: cargo build --release failed" >&2; exit 1; }
  fi
fi
DRIVERS=(fuse-overlayfs)
if [ "$DRIVER" = layerfs ]; then
  DRIVERS+=(layerfs)
  [ -n "$LAYERFS" ] || LAYERFS="$REPO/target/release/layerfs"
  [ -x "$LAYERFS" ] || { echo "podman-test: no layerfs binary at $LAYERFS" >&2; exit 1; }
  LAYERFS=$(readlink -f "$LAYERFS")
fi
REF=fuse-overlayfs

# Everything below runs in private mount and PID namespaces (this script is their pid 1: when it
# exits, the kernel ends whatever is left, daemons included), with /etc, /var and /run covered by
# overlays whose upper dirs live under the temp dir. unshare --fork blocks SIGINT and SIGTERM, so
# this outer shell passes them on (as SIGTERM: a background job starts with SIGINT ignored) to the
# namespace's pid 1, which cleans up; if this shell is killed, unshare's death sends it SIGTERM.
if [ "${LFPT_IN_NS:-}" != 1 ]; then
  export LFPT_IN_NS=1
  unshare --mount --propagation private --pid --fork --kill-child=TERM --mount-proc -- \
    bash "$0" "${ORIG_ARGS[@]}" &
  ns_parent=$!
  forward() {
    local c
    c=$(cat "/proc/$ns_parent/task/$ns_parent/children" 2>/dev/null)
    # shellcheck disable=SC2086 # a pid
    [ -n "$c" ] && kill -TERM $c 2>/dev/null
  }
  trap forward INT TERM
  while :; do
    wait "$ns_parent"; rc=$?
    kill -0 "$ns_parent" 2>/dev/null || break
  done
  exit "$rc"
fi

# ---------------------------------------------------------------- isolated set-up
T=$(mktemp -d /tmp/lfpr.XXXX)
chmod 755 "$T"
trap 'rm -rf --one-file-system "$T"' EXIT # until the full clean-up below is armed
for d in etc var run; do
  mkdir -p "$T/ns/$d/u" "$T/ns/$d/w"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/ns/$d/u,workdir=$T/ns/$d/w" "/$d" ||
    { echo "podman-test: cannot cover /$d with an overlay" >&2; rm -rf "$T"; exit 1; }
done
LOG="$T/logs"
mkdir -p "$LOG" "$T/bin"
unset CONTAINER_HOST CONTAINER_CONNECTION DOCKER_HOST BUILDAH_ISOLATION STORAGE_DRIVER STORAGE_OPTS
unset CONTAINERS_STORAGE_CONF CONTAINERS_CONF CONTAINERS_REGISTRIES_CONF REGISTRY_AUTH_FILE

# the user, in the /etc overlay: nothing reaches the host's /etc
free_id() { # the first id from 2000 up that is neither a uid nor a gid
  local i=2000
  while getent passwd "$i" >/dev/null || getent group "$i" >/dev/null; do i=$((i + 1)); done
  echo "$i"
}
if getent passwd "$USER_NAME" >/dev/null; then
  echo "podman-test: using the existing user $USER_NAME"
else
  id_=$(free_id)
  if ! groupadd -g "$id_" "$USER_NAME" || ! useradd -u "$id_" -g "$id_" -M -d "$T/home" -s /bin/sh "$USER_NAME"; then
    echo "podman-test: cannot create the user $USER_NAME" >&2; exit 1
  fi
fi
U=$(id -u "$USER_NAME"); G=$(id -g "$USER_NAME")
sub_ids() { # sub_ids FILE: give the user 65536 subordinate ids in FILE unless it has some
  local f=$1 start
  grep -q "^$USER_NAME:\|^$U:" "$f" 2>/dev/null && return 0
  start=$(awk -F: 'BEGIN { m = 100000 } NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$f" 2>/dev/null)
  echo "$USER_NAME:${start:-100000}:65536" >>"$f"
}
sub_ids /etc/subuid; sub_ids /etc/subgid
SUBUID=$(grep "^$USER_NAME:" /etc/subuid | head -1 | cut -d: -f2-)
SUBGID=$(grep "^$USER_NAME:" /etc/subgid | head -1 | cut -d: -f2-)

# /dev/fuse of mode 0666 in this mount namespace only: a node of the same device bound over it
FUSE_MODE=$(stat -c %a /dev/fuse) || { echo "podman-test: no /dev/fuse" >&2; exit 1; }
if ! mknod -m 0666 "$T/fuse" c "$((0x$(stat -c %t /dev/fuse)))" "$((0x$(stat -c %T /dev/fuse)))" ||
  ! mount --bind "$T/fuse" /dev/fuse; then
  echo "podman-test: cannot give /dev/fuse mode 0666 in the test's namespace" >&2; exit 1
fi

# mount programs: fuse-overlayfs, and a copy of layerfs (so a rebuild cannot change it mid-run)
declare -A MP_REAL=([fuse-overlayfs]=/usr/bin/fuse-overlayfs)
if [ -n "$LAYERFS" ]; then cp "$LAYERFS" "$T/bin/layerfs"; MP_REAL[layerfs]="$T/bin/layerfs"; fi
declare -A SHORT=([fuse-overlayfs]=fo [layerfs]=lf)

# every podman/buildah call gets a time limit, so that a hung mount cannot hang the test
TMO=${PODMAN_TEST_TIMEOUT:-240}
D="" DRV="" UENV=() ASU=() CUR_CHECK=""
use_driver() { # use_driver NAME: the storage, configs and environment of that driver's runs
  DRV=$1; D="$T/${SHORT[$1]}"
  UENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="$D/home"
    USER="$USER_NAME" LOGNAME="$USER_NAME" SHELL=/bin/sh XDG_RUNTIME_DIR="$D/xdg"
    XDG_CONFIG_HOME="$D/home/.config" XDG_DATA_HOME="$D/home/.local/share" TMPDIR="$D/tmp"
    CONTAINERS_STORAGE_CONF="$D/home/.config/containers/storage.conf" CONTAINERS_CONF="$D/etc/containers.conf"
    CONTAINERS_REGISTRIES_CONF="$D/etc/registries.conf" REGISTRY_AUTH_FILE="$D/etc/auth.json")
  # as the user, in that environment only (the mount-program shim logs LFPT_CHECK)
  ASU=(setpriv --reuid="$U" --regid="$G" --init-groups -- env -i "${UENV[@]}")
}
pm() { timeout -k 10 "$TMO" "${ASU[@]}" LFPT_CHECK="$CUR_CHECK" podman "$@"; }
bh() { timeout -k 10 "$((TMO * 3))" "${ASU[@]}" LFPT_CHECK="$CUR_CHECK" buildah "$@"; }
RUN=(run --pull=never --network=none)

setup_driver() { # the user's directories and configs for one mount program
  use_driver "$1"
  mkdir -p "$D"/{home/.config/containers,xdg,etc,root,run,tmp,libpod,logs,w}
  chmod 700 "$D/xdg"
  # the mount program goes through a shim that records its argv (and the check that caused it)
  cat >"$D/mp" <<EOF
#!/bin/bash
by=\$(tr '\\0\\n' '  ' </proc/\$PPID/cmdline 2>/dev/null | cut -c1-120)
echo "argv: \$* [check: \${LFPT_CHECK:-}] [by: \$by]" >>"$D/logs/mount-program.log"
"${MP_REAL[$DRV]}" "\$@"; rc=\$?
echo "rc=\$rc" >>"$D/logs/mount-program.log"
exit \$rc
EOF
  chmod 755 "$D/mp"
  # (rootless containers-storage takes graphroot and runroot from the user's own storage.conf
  # only, $XDG_CONFIG_HOME/containers/storage.conf; from any other it takes rootless_storage_path)
  cat >"$D/home/.config/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$D/root"
runroot = "$D/run"
rootless_storage_path = "$D/root"
[storage.options]
additionalimagestores = []
[storage.options.overlay]
mountopt = "nodev"
mount_program = "$D/mp"
EOF
  cat >"$D/etc/containers.conf" <<EOF
[containers]
netns = "none"
log_driver = "k8s-file"
cgroups = "enabled"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$D/logs/events.log"
tmp_dir = "$D/libpod"
static_dir = "$D/root/libpod"
volume_path = "$D/root/volumes"
image_copy_tmp_dir = "$D/tmp"
EOF
  printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' >"$D/etc/registries.conf"
  echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$D/etc/policy.json"
  cp "$D/etc/policy.json" "$D/home/.config/containers/policy.json"
  echo '{"auths":{}}' >"$D/etc/auth.json"
  chown -R "$U:$G" "$D"
}

# ---------------------------------------------------------------- clean-up
ns_procs() { # every other process in our PID namespace: all started by this script
  local d p
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] || [ "$p" = 1 ] && continue
    [ -r "$d/cmdline" ] && echo "$p"
  done
  return 0
}
DONE_DRIVERS=()
cleanup() {
  local rc=$? m p left="" drv
  trap - EXIT INT TERM
  set +e
  CUR_CHECK=cleanup TMO=60
  for drv in "${DONE_DRIVERS[@]}"; do
    use_driver "$drv"
    if [ "$KEEP" != 1 ]; then
      pm rm -a -f -t 0 >/dev/null 2>&1
      pm unshare podman image umount -a -f >/dev/null 2>&1
      pm system reset -f >/dev/null 2>&1
    else
      pm stop -a -t 0 >/dev/null 2>&1
    fi
  done
  # wait for what podman left running (the rootless pause process, conmon's "container cleanup",
  # exiting mount daemons), then end the rest by pid
  for _ in $(seq 20); do left=$(ns_procs); [ -z "$left" ] && break; sleep 0.25; done
  if [ -n "$left" ]; then
    for p in $left; do
      case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
        "catatonit -P"*|"rootless-podman-pause"*) ;; # the user namespace's keeper: expected
        *) echo "podman-test: ending leftover process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-150)" >&2 ;;
      esac
    done
    # shellcheck disable=SC2086,SC2046 # lists of pids
    { kill $left; sleep 1; kill -9 $(ns_procs); } 2>/dev/null
  fi
  for m in $(awk -v p="$T/" '{ m=$5; gsub(/\\040/, " ", m); if (index(m, p) == 1) print m }' /proc/self/mountinfo | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  umount /dev/fuse 2>/dev/null
  umount /run /var /etc 2>/dev/null
  if [ "$KEEP" = 1 ]; then
    echo "kept $T (logs in $LOG and $T/{fo,lf}/logs; storage in $T/{fo,lf}/root)"
  else
    rm -rf --one-file-system "$T"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "podman-test: interrupted, cleaning up" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- checks
# A check function compares what it sees with what it expects (eq); every value it compares is
# also written to its observation file, so that the run of the driver under test can be compared
# line by line with the reference's.
PASS=0 FAIL=0 FAILED=()
declare -A RESULT=()
check() { # check NAME FUNCTION
  local name=$1 fn=$2 rc obs="$LOG/$DRV.$1.obs" ref="$LOG/$REF.$1.obs" diffout=""
  CUR_CHECK=$name
  : >"$obs"
  # (in the background, so that a SIGTERM's trap runs at once, not when the check is over)
  (set -e; BAD=0; OBS=$obs; "$fn"; [ "$BAD" = 0 ]) >"$LOG/$DRV.$name.log" 2>&1 &
  wait $!
  rc=$?
  if [ "$DRV" != "$REF" ] && [ -f "$ref" ]; then
    diffout=$(diff -U0 "$ref" "$obs" | grep -v '^@@\|^---\|^+++')
    [ -n "$diffout" ] && rc=1
  fi
  CUR_CHECK=""
  if [ $rc = 0 ]; then
    PASS=$((PASS + 1)); RESULT[$DRV.$name]=PASS; echo "PASS [$DRV] $name"
  else
    FAIL=$((FAIL + 1)); FAILED+=("$DRV/$name"); RESULT[$DRV.$name]=FAIL; echo "FAIL [$DRV] $name"
    { grep -E '^(MISMATCH|  [-+])' "$LOG/$DRV.$name.log" | head -n 30
      # (a mismatch with the expectations is shown above; the comparison is shown alone)
      if [ -n "$diffout" ] && ! grep -q '^MISMATCH' "$LOG/$DRV.$name.log"; then
        echo "differs from $REF (-$REF +$DRV):"; printf '%s\n' "$diffout" | head -n 12 | sed 's/^/  /'
      elif [ -n "$diffout" ]; then
        echo "(and differs from $REF in $(printf '%s\n' "$diffout" | grep -c '^[-+]') lines)"
      fi
      grep -vE '^(MISMATCH|  [-+]|Copying |Getting image|Writing manifest|Storing signatures|[0-9a-f]{64}$)' "$LOG/$DRV.$name.log" | tail -n 6
    } | sed 's/^/    | /'
  fi
}
eq() { # eq WHAT GOT WANT: on a mismatch, print a diff and mark the check failed (it goes on)
  { echo "$1:"; printf '%s\n' "$2" | sed 's/^/  /'; } >>"$OBS"
  if [ "$2" != "$3" ]; then
    echo "MISMATCH $1 (-want +got):"
    diff -U0 <(printf '%s\n' "$3") <(printf '%s\n' "$2") | grep -v '^@@\|^---\|^+++' | sed 's/^/  /' || true
    BAD=1
  fi
  return 0
}

# ---------------------------------------------------------------- base image (offline)
# Two layers from a docker-archive made here: busybox, /etc/passwd with user:x:1000:1000, files
# owned by root, by 1000 and by the test user (U:G), a whiteout (.wh.) in the second layer.
make_base() {
  local b="$T/base" l1 l2 f
  l1="$b/l1"; l2="$b/l2"
  rm -rf "$b"
  mkdir -p "$l1"/{bin,etc,dev,proc,sys,run,tmp,root,home/user,data} "$l2/data/sub"
  cp /bin/busybox "$l1/bin/busybox"
  for f in $(/bin/busybox --list); do [ "$f" = busybox ] || ln -s busybox "$l1/bin/$f"; done
  chmod 1777 "$l1/tmp"; chmod 700 "$l1/root"; chown 1000:1000 "$l1/home/user"
  printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$l1/etc/passwd"
  printf 'root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n' >"$l1/etc/group"
  : >"$l1/etc/hosts"; : >"$l1/etc/resolv.conf"; : >"$l1/etc/hostname"; ln -s ../proc/self/mounts "$l1/etc/mtab"
  echo layer1 >"$l1/data/file.txt"
  echo gone >"$l1/data/gone.txt"
  echo del >"$l1/data/del-file"
  echo ren >"$l1/data/ren-file"

  echo original >"$l2/data/file.txt"; chown 1000:1000 "$l2/data/file.txt"; chmod 640 "$l2/data/file.txt"
  : >"$l2/data/.wh.gone.txt"
  echo mine >"$l2/data/mine.txt"; chown "$U:$G" "$l2/data/mine.txt"
  chown 1000:1000 "$l2/data/sub"; echo s >"$l2/data/sub/s"; chown 1000:1000 "$l2/data/sub/s"
  head -c 4194304 /dev/urandom >"$l2/data/big"
  sha256sum <"$l2/data/big" | cut -d' ' -f1 >"$T/big.sum"

  mkdir -p "$b/arch"
  local ids=()
  for f in l1 l2; do
    tar --numeric-owner --sort=name --mtime=@1700000000 -C "$b/$f" -cf "$b/arch/$f.tar" .
    ids+=("sha256:$(sha256sum <"$b/arch/$f.tar" | cut -d' ' -f1)")
  done
  printf '{"architecture":"amd64","os":"linux","created":"2023-11-14T22:13:20Z","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s","%s"]},"history":[{"created":"2023-11-14T22:13:20Z","created_by":"busybox-static"},{"created":"2023-11-14T22:13:20Z","created_by":"test fixtures"}]}' \
    "${ids[0]}" "${ids[1]}" >"$b/arch/config.json"
  printf '[{"Config":"config.json","RepoTags":["localhost/lfbase:latest"],"Layers":["l1.tar","l2.tar"]}]' >"$b/arch/manifest.json"
  tar -C "$b/arch" -cf "$T/base.tar" manifest.json config.json l1.tar l2.tar
  chmod 644 "$T/base.tar" "$T/big.sum"
  rm -rf "$b"
}

# ---------------------------------------------------------------- the checks
# Owners as the image has them: root 0:0, user 1000:1000, the test user U:G. (A layer's diff dir,
# the root of a rootless container's upper, is mode 555: containers-storage makes it so.)
IMAGE_OWNERS='stat -c "%n %u:%g %a" / /bin/busybox /etc/passwd /tmp /data /data/file.txt /data/mine.txt /data/sub /data/sub/s'
image_owners_want() {
  printf '%s\n' "/ 0:0 555" "/bin/busybox 0:0 755" "/etc/passwd 0:0 644" "/tmp 0:0 1777" "/data 0:0 755" \
    "/data/file.txt 1000:1000 640" "/data/mine.txt $U:$G 644" "/data/sub 1000:1000 755" "/data/sub/s 1000:1000 644"
}
upper_of() { pm container inspect --format '{{.GraphDriver.Data.UpperDir}}' "$1"; }
ustat() { # ustat CONTAINER PATH...: owners in the container's upper dir, seen in the user's namespace
  local up p
  up=$(upper_of "$1"); shift
  for p in "$@"; do pm unshare stat -c "$p %u:%g" "$up$p"; done
}

c_load() {
  pm load -i "$T/base.tar"
  eq "layers of the base image" "$(pm image inspect --format '{{len .RootFS.Layers}}' localhost/lfbase)" 2
}

c_run() {
  local out
  out=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c "
    id -u; id -g; cat /data/file.txt; test ! -e /data/gone.txt && echo no-gone
    sha256sum /data/big | cut -d' ' -f1; $IMAGE_OWNERS")
  eq "view of the image (id, file, whiteout, big file, owners)" "$out" "0
0
original
no-gone
$(cat "$T/big.sum")
$(image_owners_want)"
  out=$(pm "${RUN[@]}" --rm localhost/lfbase sh -c '
    echo hello >/tmp/new; echo more >>/tmp/new; cat /tmp/new; stat -c "%n %u:%g" /tmp/new
    echo more >>/data/file.txt; cat /data/file.txt; stat -c "%n %u:%g %a" /data/file.txt
    mkdir -p /data/d/e; echo deep >/data/d/e/f; chown -R 1000:1000 /data/d; stat -c "%n %u:%g" /data/d /data/d/e/f
    chown 65534:65534 /data/mine.txt; stat -c "%n %u:%g" /data/mine.txt
    rm /data/del-file; ls /data | tr "\n" " "')
  eq "writes in a container" "$out" "hello
more
/tmp/new 0:0
original
more
/data/file.txt 1000:1000 640
/data/d 1000:1000
/data/d/e/f 1000:1000
/data/mine.txt 65534:65534
big d file.txt mine.txt ren-file sub "
}

# --userns=keep-id: the user's uid and gid are themselves in the container, and the rest of the
# subordinate range is shifted by one; containers-storage asks the mount program to show the
# image in that mapping (uidmapping=/gidmapping=) instead of copying the image with new owners.
c_keep_id() {
  local out
  out=$(pm "${RUN[@]}" --userns=keep-id --name kid localhost/lfbase sh -c "
    id -u; id -g; $IMAGE_OWNERS; stat -c '%n %u:%g %a' /etc/group; grep -c '^$USER_NAME:' /etc/passwd
    echo x >/tmp/mine; mkdir /tmp/mydir; echo y >/tmp/mydir/f; stat -c '%n %u:%g' /tmp/mine /tmp/mydir /tmp/mydir/f
    cat /data/mine.txt; echo more >>/data/mine.txt; stat -c '%n %u:%g' /data/mine.txt")
  eq "keep-id: ids, image owners, new files" "$out" "$U
$G
$(image_owners_want)
/etc/group 0:0 644
1
/tmp/mine $U:$G
/tmp/mydir $U:$G
/tmp/mydir/f $U:$G
mine
/data/mine.txt $U:$G"
  # what the mount program stored: the image's own ids (those of the user's namespace, where
  # uid 0 is the user), not the ids of the container's mapping
  eq "keep-id: owners in the upper dir" "$(ustat kid /etc/passwd /etc/group /tmp /tmp/mine /tmp/mydir /tmp/mydir/f /data/mine.txt)" "/etc/passwd 0:0
/etc/group 0:0
/tmp 0:0
/tmp/mine $U:$G
/tmp/mydir $U:$G
/tmp/mydir/f $U:$G
/data/mine.txt $U:$G"
  pm container diff kid | sort >"$D/w/kid.diff"
  # (podman adds the user to the container's /etc/passwd and /etc/group)
  eq "keep-id: podman diff" "$(cat "$D/w/kid.diff")" "A /tmp/mine
A /tmp/mydir
A /tmp/mydir/f
C /data
C /data/mine.txt
C /etc
C /etc/group
C /etc/passwd
C /tmp"
  pm commit -q kid localhost/lfkid >/dev/null
  out=$(pm "${RUN[@]}" --rm localhost/lfkid sh -c 'stat -c "%n %u:%g %a" /tmp /tmp/mine /tmp/mydir /tmp/mydir/f /data/mine.txt /bin/busybox; cat /tmp/mydir/f /data/mine.txt')
  eq "keep-id: the committed image" "$out" "/tmp 0:0 1777
/tmp/mine $U:$G 644
/tmp/mydir $U:$G 755
/tmp/mydir/f $U:$G 644
/data/mine.txt $U:$G 644
/bin/busybox 0:0 755
y
mine
more"
  out=$(pm "${RUN[@]}" --rm --userns=keep-id localhost/lfkid sh -c 'id -u; stat -c "%n %u:%g" /tmp /tmp/mine /tmp/mydir/f /data/file.txt /bin/busybox; echo z >>/tmp/mine && cat /tmp/mine')
  eq "keep-id: the committed image with keep-id" "$out" "$U
/tmp 0:0
/tmp/mine $U:$G
/tmp/mydir/f $U:$G
/data/file.txt 1000:1000
/bin/busybox 0:0
x
z"
  pm rm -f -t 0 kid >/dev/null
}

# --uidmap/--gidmap: container ids 0-4999 are the user's namespace's 100-5099.
c_uidmap() {
  local out
  out=$(pm "${RUN[@]}" --uidmap 0:100:5000 --gidmap 0:100:5000 --name um localhost/lfbase sh -c "
    id -u; id -g; $IMAGE_OWNERS
    echo x >/tmp/x; mkdir /data/d; chown 1000:1000 /data/d; echo y >/data/d/y; chown 1000:1000 /data/d/y
    echo more >>/data/file.txt; stat -c '%n %u:%g' /tmp/x /data/d /data/d/y /data/file.txt")
  eq "uidmap: ids, image owners, new files" "$out" "0
0
$(image_owners_want)
/tmp/x 0:0
/data/d 1000:1000
/data/d/y 1000:1000
/data/file.txt 1000:1000"
  eq "uidmap: owners in the upper dir" "$(ustat um /tmp /tmp/x /data/d /data/d/y /data/file.txt)" "/tmp 0:0
/tmp/x 0:0
/data/d 1000:1000
/data/d/y 1000:1000
/data/file.txt 1000:1000"
  pm commit -q um localhost/lfum >/dev/null
  out=$(pm "${RUN[@]}" --rm localhost/lfum stat -c '%n %u:%g' /tmp/x /data/d /data/d/y /data/file.txt)
  eq "uidmap: the committed image" "$out" "/tmp/x 0:0
/data/d 1000:1000
/data/d/y 1000:1000
/data/file.txt 1000:1000"
  pm rm -f -t 0 um >/dev/null
}

c_commit_diff() {
  local out
  # `podman diff NAME` looks NAME up as an image first, and a short hex name such as "cd" is then
  # taken for the prefix of any image id that starts with it: `container diff`, and a name that is
  # no hex prefix
  pm "${RUN[@]}" --name cdiff localhost/lfbase sh -c '
    echo more >>/data/file.txt; rm /data/del-file; mv /data/ren-file /data/ren-file2
    mkdir /data/newdir; echo n >/data/newdir/n; chown 1000:1000 /data/newdir/n; chmod 600 /data/mine.txt
    echo s2 >>/data/sub/s'
  eq "podman diff" "$(pm container diff cdiff | sort)" "A /data/newdir
A /data/newdir/n
A /data/ren-file2
C /data
C /data/file.txt
C /data/mine.txt
C /data/sub
C /data/sub/s
D /data/del-file
D /data/ren-file"
  eq "owners in the upper dir" "$(ustat cdiff /data /data/file.txt /data/newdir /data/newdir/n /data/mine.txt /data/sub /data/sub/s)" "/data 0:0
/data/file.txt 1000:1000
/data/newdir 0:0
/data/newdir/n 1000:1000
/data/mine.txt $U:$G
/data/sub 1000:1000
/data/sub/s 1000:1000"
  pm commit -q cdiff localhost/lfcd >/dev/null
  eq "layers of the committed image" "$(pm image inspect --format '{{len .RootFS.Layers}}' localhost/lfcd)" 3
  out=$(pm "${RUN[@]}" --rm localhost/lfcd sh -c '
    cat /data/file.txt /data/newdir/n /data/ren-file2 /data/sub/s; ls /data | tr "\n" " "; echo
    stat -c "%n %u:%g %a" /data /data/file.txt /data/newdir /data/newdir/n /data/mine.txt /data/sub/s')
  eq "the committed image" "$out" "original
more
n
ren
s
s2
big file.txt mine.txt newdir ren-file2 sub 
/data 0:0 755
/data/file.txt 1000:1000 640
/data/newdir 0:0 755
/data/newdir/n 1000:1000 644
/data/mine.txt $U:$G 600
/data/sub/s 1000:1000 644"
  pm rm -f -t 0 cdiff >/dev/null
}

# podman image mount works only inside the user's namespace (podman unshare)
c_image_mount() {
  local out
  out=$(pm unshare sh -c '
    set -e
    m=$(podman image mount localhost/lfbase)
    grep -q " $m " /proc/self/mountinfo && echo mounted
    cat "$m/data/file.txt"; ls "$m/data" | tr "\n" " "; echo
    cd "$m" && stat -c "%n %u:%g %a" bin/busybox etc/passwd data/file.txt data/mine.txt data/sub/s
    sha256sum data/big | cut -d" " -f1
    touch data/new 2>&1 | sed "s/.*: //" || true
    cd /; podman image umount localhost/lfbase >/dev/null
    grep -c " $m " /proc/self/mountinfo || true')
  eq "image mount: files, owners, a write, unmount" "$out" "mounted
original
big del-file file.txt mine.txt ren-file sub 
bin/busybox 0:0 755
etc/passwd 0:0 644
data/file.txt 1000:1000 640
data/mine.txt $U:$G 644
data/sub/s 1000:1000 644
$(cat "$T/big.sum")
Read-only file system
0"
}

c_build() {
  local ctx="$D/w/ctx" id1 id2 n out
  mkdir -p "$ctx"
  cat >"$ctx/Containerfile" <<'EOF'
FROM localhost/lfbase
RUN mkdir /app && chown 1000:1000 /app
USER user
RUN touch /app/f && id >/app/id
EOF
  chown -R "$U:$G" "$ctx"
  local bud=(bud --layers --force-rm --pull=never --network=none --signature-policy "$D/etc/policy.json"
    --isolation oci -f "$ctx/Containerfile" -t localhost/lfapp "$ctx")
  bh "${bud[@]}" >"$D/w/build1.out" 2>&1 || { cat "$D/w/build1.out"; return 1; }
  cat "$D/w/build1.out"
  id1=$(pm image inspect --format '{{.Id}}' localhost/lfapp)
  bh "${bud[@]}" >"$D/w/build2.out" 2>&1 || { cat "$D/w/build2.out"; return 1; }
  cat "$D/w/build2.out"
  id2=$(pm image inspect --format '{{.Id}}' localhost/lfapp)
  eq "image id of the second build is the first's" "$([ "$id1" = "$id2" ] && echo same || echo "differs: $id1 $id2")" same
  n=$(grep -c 'Using cache' "$D/w/build1.out" || true)
  eq "cache hits in the first build" "$n" 0
  n=$(grep -c 'Using cache' "$D/w/build2.out" || true)
  eq "cache hits in the second build (steps 2-4)" "$n" 3
  out=$(pm "${RUN[@]}" --rm localhost/lfapp sh -c 'id; stat -c "%n %u:%g %a" /app /app/f /app/id /data/file.txt; cat /app/id')
  eq "the built image" "$out" "uid=1000(user) gid=1000(user) groups=1000(user)
/app 1000:1000 755
/app/f 1000:1000 644
/app/id 1000:1000 644
/data/file.txt 1000:1000 640
uid=1000(user) gid=1000(user) groups=1000(user)"
}

c_no_mounts_left() {
  local left procs p
  pm rm -a -f -t 0 >/dev/null
  pm unshare podman image umount -a >/dev/null
  left=$(pm unshare cat /proc/self/mountinfo | awk -v p="$D/root/" '{ m=$5; for (i = 7; $i != "-"; i++); t=$(i+1); if (index(m, p) == 1 && (t ~ /^fuse/ || t == "overlay")) print t, m }')
  eq "mounts under the storage root (in the user's namespace)" "$left" ""
  sleep 1
  procs=$(for p in $(ns_procs); do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep "^${MP_REAL[$DRV]} "; done || true)
  eq "mount-program daemons still running" "$procs" ""
}

# ---------------------------------------------------------------- run
echo "podman-test --rootless: drivers: ${DRIVERS[*]}; user $USER_NAME ($U:$G, subuid $SUBUID, subgid $SUBGID); root=$T"
echo "podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), $(runc --version | head -1), fuse-overlayfs $(/usr/bin/fuse-overlayfs --version 2>/dev/null | sed -n 's/^fuse-overlayfs: version //p')${LAYERFS:+, layerfs $LAYERFS}"
echo "/dev/fuse: mode $FUSE_MODE on the host, 0666 in the test's namespace"
START=$(date +%s)
if ! (set -e; make_base) >"$LOG/base.log" 2>&1; then
  echo "FAIL base-image (making the busybox image)"; tail -n 15 "$LOG/base.log" | sed 's/^/    | /'
  echo "0 passed, 1 failed"
  exit 1
fi
CHECKS=(run:c_run keep-id:c_keep_id uidmap:c_uidmap commit-diff:c_commit_diff image-mount:c_image_mount
  build-cache:c_build no-mounts-left:c_no_mounts_left)
for drv in "${DRIVERS[@]}"; do
  echo "== $drv: ${MP_REAL[$drv]}"
  setup_driver "$drv"
  DONE_DRIVERS+=("$drv")
  check base-image c_load
  if [ "${RESULT[$drv.base-image]}" != PASS ]; then
    for c in "${CHECKS[@]}"; do FAIL=$((FAIL + 1)); FAILED+=("$drv/${c%%:*}"); RESULT[$drv.${c%%:*}]=SKIP; done
    echo "    (the other checks are skipped for $drv)"
    continue
  fi
  for c in "${CHECKS[@]}"; do check "${c%%:*}" "${c#*:}"; done
done

echo "== summary"
printf '%-16s' check; printf '%-16s' "${DRIVERS[@]}"; echo
for c in base-image "${CHECKS[@]}"; do
  printf '%-16s' "${c%%:*}"
  for drv in "${DRIVERS[@]}"; do printf '%-16s' "${RESULT[$drv.${c%%:*}]:--}"; done
  echo
done
for drv in "${DRIVERS[@]}"; do
  f="$T/${SHORT[$drv]}/logs/mount-program.log"
  [ -s "$f" ] || continue
  echo "$drv: mount program calls per check (L = a layer link, ID = a layer id, T = the storage root):"
  grep '^argv:' "$f" | sed -E -e "s#$T/${SHORT[$drv]}/root#T#g" -e 's#T/overlay/l/[A-Z0-9]{26}#L#g' -e 's#[0-9a-f]{64}#ID#g' \
    -e 's#\[by: (podman|buildah)(-in-a-user-namespace)? (--?[^ ]+ )*([a-z]+)( (mount|umount))?.*\]$#[\1 \4\5]#' \
    -e 's#lowerdir=L(:L)*#lowerdir=L...#' |
    sort | uniq -c | sort -rn | head -n 20 | sed 's/^/    /'
  echo "    id mappings (check: values):"
  awk '/^argv:/ && /uidmapping=|gidmapping=/ {
      c = $0; sub(/.*\[check: /, "", c); sub(/\].*/, "", c)
      u = "-"; if (match($0, /uidmapping=[^, ]*/)) u = substr($0, RSTART, RLENGTH)
      g = "-"; if (match($0, /gidmapping=[^, ]*/)) g = substr($0, RSTART, RLENGTH)
      print "      " c ": " u " " g }' "$f" | sort -u
  echo "    exit codes: $(grep '^rc=' "$f" | sort | uniq -c | tr -s ' \n' '  ')"
done
echo "total time: $(( $(date +%s) - START ))s"
[ ${#FAILED[@]} -gt 0 ] && echo "failed: ${FAILED[*]}"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
