#!/usr/bin/env bash
# layerfs benchmark: layerfs against kernel overlayfs, fuse-overlayfs and native (a bind mount of
# the merged tree, the physical limit), interleaved, on a generated, seeded 3-layer stack.
#
#   sudo bash scripts/bench.sh [--quick] [--reps N] [--only W[,W..]] [--subjects S[,S..]]
#                              [--dir DIR] [--seed N] [--out PREFIX] [--keep] [--no-build]
#                              [--timeout SECONDS] [--io-uring on|off|keep]
#                              [--layerfs-opts OPTS] [--rootless]
#
# Benchmarks are not tests: nothing here asserts a time. Run with --help for the workload list.

# The wl_* functions and the trap handler are called indirectly.
# shellcheck disable=SC2317

set -uo pipefail
shopt -s nullglob
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
HELPER=$SCRIPT_DIR/bench_helper.py

ALL_WORKLOADS=(find lsR stat readdir grep seqread randread create copyup-big copyup-small rename unlink untar build depth rename-dir rename-dir-redirect chown-R chown-R-metacopy rsswalk)
ALL_SUBJECTS=(native kernel fuse-overlayfs layerfs)
[[ " $* " == *" --rootless "* ]] && ALL_SUBJECTS=(native fuse-overlayfs layerfs)

usage() {
	cat <<EOF
usage: sudo bash scripts/bench.sh [options]

  --quick            small stack (5,000 files, 128 MiB big file), 1 repetition: a smoke test
  --reps N           repetitions of every workload per subject (default 3; --quick: 1)
  --only W[,W..]     run only these workloads (default: all)
  --subjects S[,S..] subjects, in this order (default: ${ALL_SUBJECTS[*]})
  --dir DIR          work directory: stacks, runs, results (default /var/tmp/layerfs-bench)
  --seed N           generator seed (default 42)
  --out PREFIX       write PREFIX.md, PREFIX.tsv, PREFIX.raw.tsv (default DIR/results/bench-DATE)
  --keep             keep this run's upper dirs (default: deleted at the end)
  --no-build         do not run cargo build (use target/release/layerfs as it is, or \$LAYERFS)
  --timeout S        limit for one timed command (default 600)
  --io-uring M       the fuse module's enable_uring parameter for the run: keep (default: as
                     found, which a root layerfs mount turns on itself, as users get it), on,
                     or off (and layerfs mounts with -o io_uring=off, so it stays off); always
                     restored at the end. With it on, layerfs serves requests over
                     FUSE-over-io_uring on the calling CPU (fuse-overlayfs cannot use it). The
                     report says which transport each subject used
  --layerfs-opts O   mount options for layerfs (-o O), e.g. cache_small_files=128K (default none)
  --rootless         mount the FUSE subjects as rootless podman does: the whole run happens in a
                     user namespace (ids mapped one to one, no capability in the host's
                     namespace), so the kernel refuses FUSE passthrough and FUSE-over-io_uring
                     set-up stays as the host has it. Subjects: fuse-overlayfs, layerfs and
                     native (kernel overlayfs needs the host's trusted.* xattrs)

workloads: ${ALL_WORKLOADS[*]}
  find, lsR, stat, readdir, grep, seqread, randread: cold (fresh mount, caches dropped) then warm
  create (10,000 small files), copyup-big (O_RDWR + 1 byte on the 1 GiB file), copyup-small,
  rename, unlink (1,000 lower files each), untar (~200 MB), build (cp -a of tree/src, then grep -r),
  depth (stat of the same 10,000 files with 2, 20 and 100 lower layers; also depth2, depth20,
  depth100), rename-dir (mv of the merged 10,000-file directory \`wide\` to a new name: the kernel
  answers EXDEV and mv copies the tree, layerfs copies it up itself), rename-dir-redirect (the
  same with -o redirect_dir=on for the kernel and layerfs: a redirect is recorded),
  chown-R (chown -R 1000:1000 of the lower tree tree/src: every file is copied up, data
  included), chown-R-metacopy (the same with -o metacopy=on for the kernel and layerfs: the
  files' metadata only; fuse-overlayfs has no such option and copies as before),
  rsswalk (daemon RSS over repeated ls -lR walks, caches dropped between walks)
Needs root (mount, drop_caches, mknod). Results: a markdown table on stdout and in PREFIX.md.
EOF
}

# ------------------------------------------------------------------------------ options

DIR=/var/tmp/layerfs-bench
REPS=""
QUICK=0
ONLY=""
SUBJECTS_ARG=""
SEED=42
OUT=""
KEEP=0
BUILD=1
TIMEOUT=600
IO_URING=keep
LAYERFS_OPTS=""
EXTRA_OPTS=""
ROOTLESS=0
ORIG_ARGS=("$@")
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_SAVED=""

while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--reps) REPS=${2:?}; shift ;;
	--only) ONLY=${2:?}; shift ;;
	--subjects) SUBJECTS_ARG=${2:?}; shift ;;
	--dir) DIR=${2:?}; shift ;;
	--seed) SEED=${2:?}; shift ;;
	--out) OUT=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--no-build) BUILD=0 ;;
	--timeout) TIMEOUT=${2:?}; shift ;;
	--io-uring) IO_URING=${2:?}; shift ;;
	--layerfs-opts) LAYERFS_OPTS=${2:?}; shift ;;
	--rootless) ROOTLESS=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "bench.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

die() { echo "bench.sh: $*" >&2; exit 1; }
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; [[ -n ${LOG:-} ]] && printf '%s %s\n' "$(date +%T)" "$*" >>"$LOG"; return 0; }

[[ $REPS =~ ^[0-9]*$ && $SEED =~ ^[0-9]+$ && $TIMEOUT =~ ^[0-9]+$ ]] || die "--reps, --seed and --timeout take numbers"
if [[ -z $REPS ]]; then
	if ((QUICK)); then REPS=1; else REPS=3; fi
fi
((REPS >= 1)) || die "--reps must be at least 1"
[[ $IO_URING == on || $IO_URING == off || $IO_URING == keep ]] || die "--io-uring takes on, off or keep"
((EUID == 0)) || die "needs root (kernel overlay mounts, drop_caches, whiteout devices)"

# --rootless: the host side sets enable_uring, builds layerfs and drops caches on request (a
# user namespace may not); everything else runs again in a new user namespace whose root is
# the host's root without its capabilities, with a mount namespace of its own (slave, so the
# host's mounts still show).
if ((ROOTLESS)) && [[ -z ${LFB_IN_USERNS:-} ]]; then
	command -v unshare >/dev/null || die "--rootless needs unshare (util-linux)"
	mkdir -p "$DIR" || die "cannot create $DIR"
	if [[ -w $URING_PARAM ]]; then
		URING_SAVED=$(cat "$URING_PARAM")
		case $IO_URING in
		on) echo Y >"$URING_PARAM" ;;
		off) echo N >"$URING_PARAM" ;;
		esac
	fi
	if ((BUILD)) && [[ " ${SUBJECTS_ARG:-layerfs} " == *layerfs* ]]; then
		log "building layerfs (cargo build --release in $REPO)"
		(cd "$REPO" && "$(command -v cargo || echo "$HOME/.cargo/bin/cargo")" build --release) >/dev/null 2>&1 ||
			log "warning: the layerfs build failed"
	fi
	# The stack (trusted.* xattrs, the native copy through a kernel overlay mount) is made on
	# the host side: a run of one cheap cell does it, or finds it made.
	prime=()
	skip=0
	for a in "${ORIG_ARGS[@]}"; do
		if ((skip)); then skip=0; continue; fi
		case $a in
		--rootless) ;;
		--only | --subjects | --reps | --out | --io-uring) skip=1 ;;
		*) prime+=("$a") ;;
		esac
	done
	log "rootless: making (or checking) the stack on the host side"
	bash "$0" "${prime[@]}" --only find --subjects native --reps 1 --no-build --io-uring keep >/dev/null ||
		die "preparing the stack failed"
	CHAN=$(mktemp -d "$DIR/.rootless.XXXXXX")
	mkfifo "$CHAN/go" "$CHAN/drop" "$CHAN/dropped"
	unshare --user --mount --propagation slave -- bash -c 'read -r _ <"$0/go" && exec "$@"' \
		"$CHAN" env LFB_IN_USERNS="$CHAN" bash "$0" "${ORIG_ARGS[@]}" --no-build &
	child=$!
	for _ in $(seq 100); do
		[[ $(readlink "/proc/$child/ns/user") != "$(readlink /proc/self/ns/user)" ]] && break
		sleep 0.05
	done
	echo "0 0 4294967295" >"/proc/$child/uid_map" && echo "0 0 4294967295" >"/proc/$child/gid_map" ||
		{ kill "$child"; die "cannot map ids into the user namespace"; }
	(while read -r _ <"$CHAN/drop"; do sync; echo 3 >/proc/sys/vm/drop_caches; echo >"$CHAN/dropped"; done) &
	dropper=$!
	echo go >"$CHAN/go"
	wait "$child"
	rc=$?
	kill "$dropper" 2>/dev/null
	rm -rf "$CHAN"
	[[ -n $URING_SAVED ]] && echo "$URING_SAVED" >"$URING_PARAM"
	exit $rc
fi
[[ $DIR == /* ]] || DIR=$PWD/$DIR
[[ $DIR =~ ^[A-Za-z0-9/._+-]+$ ]] || die "--dir must be a plain path (letters, digits, / . _ + -)"

SUBJECTS=()
IFS=, read -r -a SUBJECTS <<<"${SUBJECTS_ARG:-$(IFS=,; echo "${ALL_SUBJECTS[*]}")}"
for s in "${SUBJECTS[@]}"; do
	[[ " ${ALL_SUBJECTS[*]} " == *" $s "* ]] || die "unknown subject: $s (known: ${ALL_SUBJECTS[*]})"
done
WORKLOADS=()
if [[ -n $ONLY ]]; then
	IFS=, read -r -a req <<<"$ONLY"
	for w in "${req[@]}"; do
		[[ " ${ALL_WORKLOADS[*]} depth2 depth20 depth100 " == *" $w "* ]] || die "unknown workload: $w (known: ${ALL_WORKLOADS[*]})"
		WORKLOADS+=("$w")
	done
else
	WORKLOADS=("${ALL_WORKLOADS[@]}")
fi
has_subject() { [[ " ${SUBJECTS[*]} " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------ parameters

if ((QUICK)); then
	FILES=5000 DIRS=300 BIG=$((128 << 20)) WIDE=2000 NSTAT=1000 NMOD=100 DEPTH_FILES=1000
	NCREATE=1000 TAR_BYTES=$((20 << 20)) RANDREADS=2000 WALKS=3
else
	FILES=50000 DIRS=3000 BIG=$((1 << 30)) WIDE=10000 NSTAT=10000 NMOD=1000 DEPTH_FILES=10000
	NCREATE=10000 TAR_BYTES=$((200 << 20)) RANDREADS=20000 WALKS=10
fi
NEEDLE=layerfs_needle

human() { # 10000 -> 10k, 1073741824 -> 1GiB
	local n=$1
	if ((n >= 1 << 30 && n % (1 << 30) == 0)); then echo "$((n >> 30))GiB"
	elif ((n >= 1 << 20 && n % (1 << 20) == 0)); then echo "$((n >> 20))MiB"
	elif ((n >= 1000 && n % 1000 == 0)); then echo "$((n / 1000))k"
	else echo "$n"; fi
}

# ------------------------------------------------------------------------------ tools

PY=/usr/bin/python3
[[ -x $PY ]] || PY=$(command -v python3) || true
need_pkgs=()
[[ -x ${PY:-} ]] || need_pkgs+=(python3)
if has_subject fuse-overlayfs && ! command -v fuse-overlayfs >/dev/null; then need_pkgs+=(fuse-overlayfs); fi
if { has_subject layerfs || has_subject fuse-overlayfs; } && ! command -v fusermount3 >/dev/null; then need_pkgs+=(fuse3); fi
command -v pgrep >/dev/null || need_pkgs+=(procps)
if ((${#need_pkgs[@]})); then
	log "installing ${need_pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null 2>&1 ||
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null 2>&1; } ||
		log "warning: could not install ${need_pkgs[*]}"
	[[ -x ${PY:-} ]] || PY=$(command -v python3) || die "python3 is needed"
fi

mkdir -p "$DIR/results" "$DIR/runs" || die "cannot create $DIR"
exec 9>"$DIR/.lock"
flock -n 9 || die "another bench.sh is running on $DIR"

LAYERFS=${LAYERFS:-$REPO/target/release/layerfs}
LAYERFS_NOTE=""
if has_subject layerfs && ((BUILD)); then
	CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
	log "building layerfs (cargo build --release in $REPO)"
	if ! (cd "$REPO" && "$CARGO" build --release) >"$DIR/results/build.log" 2>&1; then
		tail -5 "$DIR/results/build.log" >&2
		log "warning: the layerfs build failed (see $DIR/results/build.log): its cells will FAIL"
		LAYERFS_NOTE="build failed"
	fi
fi
if has_subject layerfs && [[ -z $LAYERFS_NOTE && ! -x $LAYERFS ]]; then LAYERFS_NOTE="no binary at $LAYERFS"; fi

# ------------------------------------------------------------------------------ mounts and cleanup

LAYERFS_TRANSPORT="" # what layerfs's daemons were seen serving on
declare -A MOUNTED=() # mountpoint -> daemon pid (or -) for every mount made by this script
RUN=""
TMPO=""
LOG=""

is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }
mounted_under() { awk -v p="$1/" 'index($5, p) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# The FUSE daemon serving MNT: a process of EXE (basename) with MNT as one of its arguments.
daemon_pid() {
	local mnt=$1 exe=$2 p
	for p in $(pgrep -f -- "$mnt"); do
		[[ $(readlink "/proc/$p/exe" 2>/dev/null) == */"$exe" ]] || continue
		tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$mnt" || continue
		[[ $(awk '/^State:/ { print $2 }' "/proc/$p/status" 2>/dev/null) == Z ]] && continue
		echo "$p"
		return 0
	done
	return 1
}
alive() { [[ -d /proc/$1 && $(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) != Z ]]; }

# Unmount MNT (made by us) and make sure its daemon is gone.
unmount() {
	local mnt=$1 pid=${MOUNTED[$1]:--} i dev rc
	# --no-canonicalize: no stat of the mountpoint, which would hang on a stuck daemon.
	# Retry quick failures (EBUSY from a lingering process), not a timeout.
	for i in 1 2 3; do
		is_mounted "$mnt" || break
		timeout 15 umount --no-canonicalize "$mnt" 2>>"${LOG:-/dev/null}"
		rc=$?
		((rc == 0 || rc == 124)) && break
		sleep 1
	done
	if is_mounted "$mnt"; then
		log "warning: $mnt did not unmount cleanly: aborting it"
		dev=$(awk -v m="$mnt" '$5 == m { split($3, d, ":"); print d[2] }' /proc/self/mountinfo | head -1)
		if [[ $pid != - && -n $dev && -w /sys/fs/fuse/connections/$dev/abort ]]; then
			echo 1 >"/sys/fs/fuse/connections/$dev/abort"
		fi
		timeout 15 umount --no-canonicalize "$mnt" 2>>"${LOG:-/dev/null}" ||
			timeout 15 umount --no-canonicalize -l "$mnt" 2>>"${LOG:-/dev/null}"
	fi
	if [[ $pid != - ]]; then
		for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
		if alive "$pid"; then
			kill -TERM "$pid" 2>/dev/null
			sleep 2
			alive "$pid" && kill -KILL "$pid" 2>/dev/null
		fi
	fi
	is_mounted "$mnt" || unset 'MOUNTED[$mnt]'
}

safe_rm() { # remove DIR unless something is mounted below it
	local d=$1
	[[ -e $d ]] || return 0
	if mounted_under "$d"; then
		log "warning: not removing $d: something is still mounted below it"
		return 1
	fi
	rm -rf --one-file-system "$d"
	touch "$DIR/.last-mass-delete"
}

cleanup() {
	local m
	trap - EXIT INT TERM
	for m in "${!MOUNTED[@]}"; do unmount "$m"; done
	[[ -n $TMPO ]] && rm -f "$TMPO"
	[[ -n $URING_SAVED ]] && echo "$URING_SAVED" >"$URING_PARAM"
	if [[ -n $RUN && -d $RUN ]]; then
		if ((KEEP)); then
			log "kept $RUN"
		else
			log "removing this run's upper directories ($RUN)"
			safe_rm "$RUN"
		fi
	fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

drop_caches() {
	if [[ -n ${LFB_IN_USERNS:-} ]]; then
		echo >"$LFB_IN_USERNS/drop" && read -r _ <"$LFB_IN_USERNS/dropped"
	else
		sync
		echo 3 >/proc/sys/vm/drop_caches
	fi
}

if [[ -w $URING_PARAM && -z ${LFB_IN_USERNS:-} ]]; then
	# layerfs's own mounts may turn it on: whatever happens, the host gets its setting back.
	URING_SAVED=$(cat "$URING_PARAM")
	case $IO_URING in
	on) echo Y >"$URING_PARAM" ;;
	off) echo N >"$URING_PARAM" ;;
	esac
elif [[ $IO_URING == on && ! -e $URING_PARAM ]]; then
	log "this kernel has no $URING_PARAM: layerfs runs over /dev/fuse"
fi
# With io_uring off for the run, layerfs must not turn it back on.
if [[ $IO_URING == off ]]; then LAYERFS_OPTS=${LAYERFS_OPTS:+$LAYERFS_OPTS,}io_uring=off; fi

# mount_subject SUBJECT MNT UPPER|- WORK|- LOWER... (top first; native: LOWER is the tree to bind)
# Sets MPID (daemon pid or -). Returns 1 (with a reason in MFAIL) if the mount is not live.
mount_subject() {
	local subj=$1 mnt=$2 upper=$3 work=$4
	shift 4
	local -a lowers=("$@") args=() rel=()
	local l opts rc=0 err
	err=$(mktemp)
	MPID=-
	MFAIL=""
	mkdir -p "$mnt"
	case $subj in
	native) timeout 60 mount --bind "${lowers[0]}" "$mnt" 2>"$err" || rc=$? ;;
	kernel)
		# relative names from the common parent keep a 100-layer option under one page
		for l in "${lowers[@]}"; do rel+=("${l##*/}"); done
		opts="lowerdir=$(IFS=:; echo "${rel[*]}")"
		[[ $upper != - ]] && opts+=",upperdir=$upper,workdir=$work"
		[[ -n $EXTRA_OPTS ]] && opts+=",$EXTRA_OPTS"
		(cd "${lowers[0]%/*}" && timeout 60 mount -t overlay overlay -o "$opts" "$mnt") 2>"$err" || rc=$?
		;;
	fuse-overlayfs)
		opts="lowerdir=$(IFS=:; echo "${lowers[*]}")"
		[[ $upper != - ]] && opts+=",upperdir=$upper,workdir=$work"
		timeout 60 fuse-overlayfs -o "$opts" "$mnt" 2>"$err" || rc=$?
		;;
	layerfs)
		local lopts=$LAYERFS_OPTS
		[[ -n $EXTRA_OPTS ]] && lopts=${lopts:+$lopts,}$EXTRA_OPTS
		if [[ -n $LAYERFS_NOTE ]]; then
			MFAIL=$LAYERFS_NOTE
			rm -f "$err"
			return 1
		fi
		for l in "${lowers[@]}"; do args+=(--lower "$l"); done
		[[ $upper != - ]] && args+=(--upper "$upper" --work "$work")
		[[ -n $lopts ]] && args+=(-o "$lopts")
		timeout 60 "$LAYERFS" mount "${args[@]}" "$mnt" 2>"$err" || rc=$?
		;;
	esac
	if is_mounted "$mnt"; then
		case $subj in
		fuse-overlayfs) MPID=$(daemon_pid "$mnt" fuse-overlayfs) || MPID=- ;;
		layerfs) MPID=$(daemon_pid "$mnt" "${LAYERFS##*/}") || MPID=- ;;
		esac
		MOUNTED[$mnt]=$MPID
	fi
	if [[ $subj == layerfs && $MPID != - ]] && is_mounted "$mnt"; then
		local t="/dev/fuse"
		compgen -G "/proc/$MPID/task/*" >/dev/null && grep -qs '^layerfs-ring-' /proc/"$MPID"/task/*/comm && t="FUSE-over-io_uring"
		if [[ -z $LAYERFS_TRANSPORT ]]; then LAYERFS_TRANSPORT=$t
		elif [[ $LAYERFS_TRANSPORT != "$t" ]]; then LAYERFS_TRANSPORT="mixed (/dev/fuse and FUSE-over-io_uring)"; fi
	fi
	if ((rc)) || ! is_mounted "$mnt"; then
		MFAIL="mount failed (exit $rc): $(grep -v 'unknown argument ignored' "$err" | tail -1 | cut -c1-120)"
		cat "$err" >>"$LOG"
		rm -f "$err"
		is_mounted "$mnt" && unmount "$mnt"
		return 1
	fi
	cat "$err" >>"$LOG"
	rm -f "$err"
	return 0
}

# CPU ticks: BUSY_ALL/TOTAL_ALL over all CPUs (steal counts as busy: time taken by other guests)
# and OWN: children of this script (the workload, once waited for) plus the FUSE daemon
cpu_sample() { # DAEMON_PID|-
	local _c u n s i w q sq st
	read -r _c u n s i w q sq st _ </proc/stat
	BUSY_ALL=$((u + n + s + q + sq + st))
	TOTAL_ALL=$((BUSY_ALL + i + w))
	OWN=$(awk '{ print $16 + $17 }' "/proc/$$/stat")
	if [[ $1 != - ]]; then OWN=$((OWN + $(awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0))); fi
}
# Percent of the machine's CPU time used by anything but this benchmark between two samples
other_cpu() { # B0 T0 O0 B1 T1 O1
	local total=$(($5 - $2)) other=$((($4 - $1) - ($6 - $3)))
	((total > 0)) || { echo 0; return; }
	((other > 0)) || other=0
	echo $((100 * other / total))
}

daemon_kib() { # FIELD (VmHWM/VmRSS) of PID in KiB, or empty
	[[ $2 != - ]] && awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status" 2>/dev/null
}

# ------------------------------------------------------------------------------ stack

GENV=$("$PY" "$HELPER" version) || die "cannot run $HELPER"
PARAMS="v$GENV seed=$SEED files=$FILES dirs=$DIRS big=$BIG wide=$WIDE nstat=$NSTAT nmod=$NMOD depth=$DEPTH_FILES"
KEY=$(printf '%s' "$PARAMS" | sha1sum | cut -c1-12)
STACK=$DIR/stack-$KEY
NATIVE=$STACK/native
TARBALL=$STACK/untar-$TAR_BYTES.tar
LISTS=$STACK/lists
MAIN_LOWERS=("$STACK/layers/top" "$STACK/layers/mid" "$STACK/layers/base")

# stacks made by another generator version can never be reused
for d in "$DIR"/stack-*; do
	[[ $d != "$STACK" ]] || continue
	grep -q "^v$GENV " "$d/.complete" 2>/dev/null && continue
	log "removing a stack of another generator version: $d"
	safe_rm "$d"
done
# leftovers of runs that did not finish
for d in "$DIR"/runs/*; do
	log "removing a leftover run: $d"
	safe_rm "$d"
done

avail=$(df --output=avail -B1 "$DIR" | tail -1)
need=$((1 << 30))
[[ -f $STACK/.complete ]] || need=$((need + 2 * (BIG + FILES * 12000) + DEPTH_FILES * 2000))
[[ -f $STACK/.native-done ]] || need=$((need + BIG + FILES * 12000))
per_rep=0
for w in "${WORKLOADS[@]}"; do
	case $w in
	copyup-big) per_rep=$((per_rep + 3 * BIG)) ;;
	untar) per_rep=$((per_rep + 4 * TAR_BYTES * 3 / 2)) ;;
	create) per_rep=$((per_rep + 4 * NCREATE * 6000)) ;;
	build | chown-R*) per_rep=$((per_rep + 4 * FILES * 2000)) ;;
	esac
done
need=$((need + REPS * per_rep))
if ((avail < need)); then
	die "not enough space in $DIR: about $((need >> 30)) GiB needed, $((avail >> 30)) GiB free"
fi
log "space: about $((need >> 30)) GiB needed, $((avail >> 30)) GiB free"

if [[ ! -f $STACK/.complete ]]; then
	safe_rm "$STACK" || die "cannot clear $STACK"
	mkdir -p "$STACK"
	log "generating the lower stack in $STACK ($PARAMS)"
	"$PY" "$HELPER" gen --out "$STACK" --seed "$SEED" --files "$FILES" --dirs "$DIRS" --big "$BIG" \
		--wide "$WIDE" --nstat "$NSTAT" --nmod "$NMOD" --depth-files "$DEPTH_FILES" >"$STACK/gen.log" 2>&1 ||
		{ cat "$STACK/gen.log" >&2; die "generation failed"; }
	echo "$PARAMS" >"$STACK/.complete"
fi
if [[ -f $STACK/.native-dirty ]]; then
	log "the native copy was left modified by an interrupted run: rebuilding it"
	safe_rm "$NATIVE" || die "cannot clear $NATIVE"
	rm -f "$STACK/.native-done" "$STACK/.native-dirty"
fi
if [[ ! -f $STACK/.native-done ]]; then
	log "building the native (merged) copy through a kernel overlay mount"
	LOG=$STACK/gen.log
	safe_rm "$NATIVE.tmp"
	mkdir -p "$NATIVE.tmp"
	mount_subject kernel "$STACK/.merge-mnt" - - "${MAIN_LOWERS[@]}" || die "cannot mount the stack: $MFAIL"
	cp -a "$STACK/.merge-mnt/." "$NATIVE.tmp/" || die "copying the merged tree failed"
	unmount "$STACK/.merge-mnt"
	safe_rm "$NATIVE"
	mv "$NATIVE.tmp" "$NATIVE" && touch "$STACK/.native-done"
	LOG=""
fi
if [[ ! -f $TARBALL ]]; then
	log "making the untar tarball ($(human "$TAR_BYTES") of tree/data)"
	if ! { "$PY" "$HELPER" tarlist "$NATIVE" tree/data "$TAR_BYTES" >"$STACK/tarlist" 2>>"$STACK/gen.log" &&
		tar -cf "$TARBALL.tmp" -C "$NATIVE" --no-recursion -T "$STACK/tarlist" &&
		mv "$TARBALL.tmp" "$TARBALL"; }; then
		die "making the tarball failed"
	fi
fi

# ------------------------------------------------------------------------------ run directory

STAMP=$(date +%Y%m%d-%H%M%S)
RUN=$DIR/runs/$STAMP-$$
mkdir -p "$RUN"
LOG=$RUN/bench.log
[[ -n $OUT ]] || OUT=$DIR/results/bench-$STAMP
mkdir -p "$(dirname "$OUT")"
RAW=$OUT.raw.tsv
EXTRA=$RUN/extra.md
: >"$EXTRA"
printf '#workload\trow\tsubject\trep\tseconds\tpeak_rss_kib\tnote\tother_cpu_pct\n' >"$RAW"
TMPO=$(mktemp -p /dev/shm layerfs-bench.XXXXXX 2>/dev/null || mktemp -p "$RUN")

git_commit=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD 2>/dev/null || git_commit+=" (with uncommitted changes)"
HEADER=$(
	echo "# layerfs benchmark, $(date '+%Y-%m-%d %H:%M %Z')"
	echo
	echo "- commit: $git_commit ($REPO)"
	echo "- layerfs: $({ [[ -x $LAYERFS ]] && "$LAYERFS" --version 2>&1; } | head -1)${LAYERFS_NOTE:+ ($LAYERFS_NOTE)}; mount options: ${LAYERFS_OPTS:-defaults}"
	echo "- fuse-overlayfs: $(fuse-overlayfs --version 2>/dev/null | grep -m1 'fuse-overlayfs' || echo none)"
	echo "- kernel: $(uname -r); CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) x $(nproc); memory: $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
	echo "- fuse.enable_uring at the start: $(cat "$URING_PARAM" 2>/dev/null || echo absent) (--io-uring $IO_URING; a root layerfs mount turns it on unless mounted with io_uring=off)"
	((ROOTLESS)) && echo "- rootless: every mount made in a user namespace (no host capabilities): no FUSE passthrough"
	echo "- work dir: $DIR on $(findmnt -no FSTYPE,SOURCE,OPTIONS -T "$DIR" | tr -s ' ' ' ')"
	echo "- stack: $PARAMS; $(tr -d '\n ' <"$STACK/info.json" 2>/dev/null)"
	echo "- runs: $REPS repetition(s), subjects interleaved in the order ${SUBJECTS[*]}; every cell is a fresh mount with a fresh upper/work; caches dropped before every cold run and every write workload"
)
log "run directory $RUN, results to $OUT.md"

# ------------------------------------------------------------------------------ workloads
# Each wl_* function runs in a subshell with MNT set, and prints "row<TAB>seconds|FAIL<TAB>note"
# lines. Rows it does not print are recorded as FAIL.

ELAPSED=""
T_RC=0
t_cmd() { # run a command under the time limit; ELAPSED = wall seconds
	local t0 t1 rc
	t0=$EPOCHREALTIME
	timeout -k 5 "$TIMEOUT" "$@"
	rc=$?
	t1=$EPOCHREALTIME
	T_RC=$rc
	local us=$((${t1/./} - ${t0/./}))
	ELAPSED=$(printf '%d.%06d' $((us / 1000000)) $((us % 1000000)))
	return $rc
}
failmsg() { # why the last t_cmd failed
	if ((T_RC == 124 || T_RC == 137)); then echo "timed out after $TIMEOUT s"; else echo "exit $T_RC: $(why)"; fi
}
emit() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}"; }
why() { # last line of the cell's stderr, as a FAIL note (the mountpoint shown as MNT)
	tail -1 "$CELLERR" 2>/dev/null | sed "s#$RUN/c[0-9]*/m#MNT#g" | tr '\t' ' ' | cut -c1-120
}
t_helper() { # ROW OP ARGS...: the helper times the operation itself
	local row=$1 out rc
	shift
	out=$(timeout -k 5 "$TIMEOUT" "$PY" "$HELPER" "$@")
	rc=$?
	if ((rc == 0)) && [[ -n $out ]]; then
		emit "$row" "${out%% *}" "$([[ $out == *' '* ]] && echo "${out#* }")"
	else
		T_RC=$rc
		emit "$row" FAIL "$(failmsg)"
		return 1
	fi
}

rows_of() {
	case $1 in
	find) echo "find cold|find warm" ;;
	lsR) echo "ls -lR cold|ls -lR warm" ;;
	stat) echo "stat $(human "$NSTAT") cold|stat $(human "$NSTAT") warm" ;;
	readdir) echo "readdir $(human "$WIDE") merged cold|readdir $(human "$WIDE") merged warm" ;;
	grep) echo "grep -r cold|grep -r warm" ;;
	seqread) echo "seq read $(human "$BIG") cold|seq read $(human "$BIG") warm" ;;
	randread) echo "rand 4k read x$(human "$RANDREADS") cold|rand 4k read x$(human "$RANDREADS") warm" ;;
	create) echo "create $(human "$NCREATE") files" ;;
	copyup-big) echo "copy-up $(human "$BIG") file" ;;
	copyup-small) echo "copy-up $(human "$NMOD") small" ;;
	rename) echo "rename $(human "$NMOD") lower" ;;
	unlink) echo "unlink $(human "$NMOD") lower" ;;
	untar) echo "untar $(human "$TAR_BYTES")" ;;
	build) echo "build: cp -a src|build: grep -r copy" ;;
	depth*) echo "${1} stat $(human "$DEPTH_FILES") cold|${1} stat $(human "$DEPTH_FILES") warm" ;;
	rename-dir) echo "rename dir of $(human "$WIDE") files (copy)" ;;
	rename-dir-redirect) echo "rename dir of $(human "$WIDE") files (redirect_dir=on)" ;;
	chown-R) echo "chown -R tree/src (copy)" ;;
	chown-R-metacopy) echo "chown -R tree/src (metacopy=on)" ;;
	esac
}
row() { # N-th row name of a workload
	local -a r
	IFS='|' read -r -a r <<<"$(rows_of "$1")"
	echo "${r[$2]}"
}

wl_find() {
	local i
	for i in 0 1; do
		if t_cmd find "$MNT" >"$TMPO"; then emit "$(row find "$i")" "$ELAPSED" "n=$(wc -l <"$TMPO")"; else emit "$(row find "$i")" FAIL "$(failmsg)"; fi
	done
}
wl_lsR() {
	local i
	for i in 0 1; do
		if t_cmd ls -lR "$MNT" >"$TMPO"; then emit "$(row lsR "$i")" "$ELAPSED" "lines=$(wc -l <"$TMPO")"; else emit "$(row lsR "$i")" FAIL "$(failmsg)"; fi
	done
}
wl_stat() { t_helper "$(row stat 0)" stat "$LISTS/stat" "$MNT" && t_helper "$(row stat 1)" stat "$LISTS/stat" "$MNT"; }
wl_readdir() { t_helper "$(row readdir 0)" readdir "$MNT/wide" && t_helper "$(row readdir 1)" readdir "$MNT/wide"; }
grep_tree() { # ROW DIR: grep -rc (reads every file whole); the output goes to a tmpfs file, not
	# /dev/null, where GNU grep would stop at the first match
	local rc
	t_cmd grep -r -c "$NEEDLE" "$2" >"$TMPO"
	rc=$?
	if ((rc == 0)); then emit "$1" "$ELAPSED" "matching=$(grep -vc ':0$' "$TMPO")"; else emit "$1" FAIL "grep $(failmsg)"; return 1; fi
}
wl_grep() { grep_tree "$(row grep 0)" "$MNT/tree" && grep_tree "$(row grep 1)" "$MNT/tree"; }
wl_seqread() {
	local i
	for i in 0 1; do
		if t_cmd dd if="$MNT/big/blob.bin" of=/dev/null bs=1M status=none; then emit "$(row seqread "$i")" "$ELAPSED"; else emit "$(row seqread "$i")" FAIL "$(failmsg)"; fi
	done
}
wl_randread() { t_helper "$(row randread 0)" randread "$MNT/big/blob.bin" "$RANDREADS" && t_helper "$(row randread 1)" randread "$MNT/big/blob.bin" "$RANDREADS"; }
wl_create() { t_helper "$(row create 0)" create "$MNT/bench-create" "$NCREATE"; }
wl_copyup_big() { t_helper "$(row copyup-big 0)" copyup --file "$MNT/big/blob.bin"; }
wl_copyup_small() { t_helper "$(row copyup-small 0)" copyup --list "$LISTS/copyup" "$MNT"; }
wl_rename() { t_helper "$(row rename 0)" rename "$LISTS/rename" "$MNT"; }
wl_rename_dir() {
	# mv(1) renames, or on EXDEV (kernel overlayfs without redirect_dir) copies and removes
	if t_cmd mv "$MNT/wide" "$MNT/bench-wide-moved"; then emit "$(row "$WL" 0)" "$ELAPSED"; else emit "$(row "$WL" 0)" FAIL "$(failmsg)"; fi
}
wl_rename_dir_redirect() { wl_rename_dir; }
wl_chown_R() {
	# chown(2) of a lower file copies it up: whole, or its metadata only with metacopy=on
	if t_cmd chown -R 1000:1000 "$MNT/tree/src"; then emit "$(row "$WL" 0)" "$ELAPSED" "files=$(find "$MNT/tree/src" | wc -l)"; else emit "$(row "$WL" 0)" FAIL "$(failmsg)"; fi
}
wl_chown_R_metacopy() { wl_chown_R; }
wl_unlink() { t_helper "$(row unlink 0)" unlink "$LISTS/unlink" "$MNT"; }
wl_untar() {
	if ! mkdir "$MNT/bench-untar"; then
		emit "$(row untar 0)" FAIL "$(why)"
	elif t_cmd tar -xf "$TARBALL" -C "$MNT/bench-untar"; then
		emit "$(row untar 0)" "$ELAPSED"
	else
		emit "$(row untar 0)" FAIL "$(failmsg)"
	fi
}
wl_build() {
	if t_cmd cp -a "$MNT/tree/src" "$MNT/bench-build"; then
		emit "$(row build 0)" "$ELAPSED"
		grep_tree "$(row build 1)" "$MNT/bench-build"
	else
		emit "$(row build 0)" FAIL "$(failmsg)"
	fi
}
wl_depth() { t_helper "$(row "$WL" 0)" stat "$LISTS/depth" "$MNT" && t_helper "$(row "$WL" 1)" stat "$LISTS/depth" "$MNT"; }

# native is the merged copy itself: undo what a write workload did to it, without deleting data
WRITE_WORKLOADS=" create copyup-big copyup-small rename unlink untar build rename-dir rename-dir-redirect chown-R chown-R-metacopy "
native_pre() {
	[[ $WRITE_WORKLOADS == *" $1 "* ]] && touch "$STACK/.native-dirty"
	case $1 in
	unlink) "$PY" "$HELPER" keep "$LISTS/unlink" "$NATIVE" "$2/keep" ;;
	esac
}
native_post() {
	local wl=$1 c=$2 d
	case $wl in
	unlink) "$PY" "$HELPER" restore "$LISTS/unlink" "$NATIVE" "$c/keep" ;;
	rename) "$PY" "$HELPER" rename --back "$LISTS/rename" "$NATIVE" ;;
	rename-dir*) mv "$NATIVE/bench-wide-moved" "$NATIVE/wide" ;;
	chown-R*) chown -R 0:0 "$NATIVE/tree/src" ;; # the generator (root) made it all 0:0
	esac
	for d in "$NATIVE"/bench-*; do
		mkdir -p "$c/moved"
		mv "$d" "$c/moved/"
	done
	rm -f "$STACK/.native-dirty"
}

CELL=0
NCELLS=0
run_cell() { # WORKLOAD SUBJECT REP
	local wl=$1 subj=$2 rep=$3 c out rss="" other="" line r v
	local -a lowers rows
	CELL=$((CELL + 1))
	c=$(printf '%s/c%04d' "$RUN" "$CELL")
	mkdir -p "$c/u" "$c/w"
	CELLERR=$c/stderr
	: >"$CELLERR"
	local upper=$c/u work=$c/w
	case $wl in
	depth*)
		local n=${wl#depth} i
		lowers=()
		for ((i = 100 - n; i < 100; i++)); do lowers+=("$(printf '%s/depth/%02d' "$STACK" "$i")"); done
		upper=- work=-
		[[ $subj == native ]] && lowers=("$STACK/depth/99")
		;;
	*)
		lowers=("${MAIN_LOWERS[@]}")
		[[ $subj == native ]] && lowers=("$NATIVE") && upper=- work=-
		;;
	esac
	IFS='|' read -r -a rows <<<"$(rows_of "$wl")"
	out=""
	EXTRA_OPTS=""
	[[ $wl == rename-dir-redirect && $subj != native ]] && EXTRA_OPTS=redirect_dir=on
	[[ $wl == chown-R-metacopy && $subj != native ]] && EXTRA_OPTS=metacopy=on
	if mount_subject "$subj" "$c/m" "$upper" "$work" "${lowers[@]}"; then
		local pid=$MPID
		if [[ $subj == native ]]; then native_pre "$wl" "$c" 2>>"$CELLERR"; fi
		drop_caches
		local fn=wl_${wl//-/_} b0 t0 o0
		[[ $wl == depth* ]] && fn=wl_depth
		cpu_sample "$pid"
		b0=$BUSY_ALL t0=$TOTAL_ALL o0=$OWN
		out=$(MNT=$c/m WL=$wl "$fn" 2>>"$CELLERR")
		cpu_sample "$pid"
		other=$(other_cpu "$b0" "$t0" "$o0" "$BUSY_ALL" "$TOTAL_ALL" "$OWN")
		rss=$(daemon_kib VmHWM "$pid")
		unmount "$c/m"
		if [[ $subj == native ]]; then native_post "$wl" "$c" 2>>"$CELLERR"; fi
	else
		out=""
		for r in "${rows[@]}"; do out+=$(emit "$r" FAIL "$MFAIL")$'\n'; done
	fi
	cat "$CELLERR" >>"$LOG"
	local summary=""
	for r in "${rows[@]}"; do
		line=$(awk -F'\t' -v r="$r" '$1 == r { print; exit }' <<<"$out")
		[[ -n $line ]] || line=$(emit "$r" FAIL "not run: $(why)")
		IFS=$'\t' read -r _ v note <<<"$line"
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$r" "$subj" "$rep" "$v" "$rss" "${note:-}" "$other" >>"$RAW"
		if ((${#rows[@]} > 1)); then summary+=" ${r##* }=$v"; else summary+=" $v"; fi
	done
	log "[$CELL/$NCELLS] $wl rep $rep $subj:$summary${rss:+ rss=$((rss / 1024))MiB}${other:+ other-cpu=$other%}"
}

rss_walks() { # daemon memory over repeated walks, caches dropped in between (forget handling)
	local subj c pid i rsslist times
	{
		echo "Daemon memory over $WALKS walks of the whole mount (ls -lR, caches dropped before each walk): VmRSS MiB after each walk, then VmHWM; walk times in s."
		echo
	} >>"$EXTRA"
	for subj in fuse-overlayfs layerfs; do
		has_subject "$subj" || continue
		CELL=$((CELL + 1))
		c=$(printf '%s/c%04d' "$RUN" "$CELL")
		mkdir -p "$c/u" "$c/w"
		CELLERR=$c/stderr
		if ! mount_subject "$subj" "$c/m" "$c/u" "$c/w" "${MAIN_LOWERS[@]}"; then
			echo "- $subj: FAIL ($MFAIL)" >>"$EXTRA"
			continue
		fi
		pid=$MPID rsslist="" times=""
		for ((i = 1; i <= WALKS; i++)); do
			drop_caches
			if t_cmd ls -lR "$c/m" >/dev/null 2>>"$CELLERR"; then times+=" $(printf '%.2f' "$ELAPSED")"; else times+=" FAIL"; fi
			rsslist+=" $(awk -v k="$(daemon_kib VmRSS "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')"
		done
		echo "- $subj: RSS$rsslist; HWM $(awk -v k="$(daemon_kib VmHWM "$pid")" 'BEGIN { printf "%.1f", k / 1024 }'); times$times" >>"$EXTRA"
		unmount "$c/m"
		log "rsswalk $subj: RSS$rsslist"
	done
}

# ------------------------------------------------------------------------------ run

EXPANDED=()
for w in "${WORKLOADS[@]}"; do
	case $w in
	depth) EXPANDED+=(depth2 depth20 depth100) ;;
	*) EXPANDED+=("$w") ;;
	esac
done
for w in "${EXPANDED[@]}"; do [[ $w == rsswalk ]] || NCELLS=$((NCELLS + REPS * ${#SUBJECTS[@]})); done

# ext4 without a journal creates files slowly for about a minute after mass deletions
if [[ -f $DIR/.last-mass-delete ]]; then
	age=$(($(date +%s) - $(stat -c %Y "$DIR/.last-mass-delete")))
	if ((age < 60)); then
		log "waiting $((60 - age)) s after the last mass deletion (ext4 creates files slowly until then)"
		sleep $((60 - age))
	fi
fi

T_START=$(date +%s)
for w in "${EXPANDED[@]}"; do
	if [[ $w == rsswalk ]]; then
		rss_walks
		continue
	fi
	for ((rep = 1; rep <= REPS; rep++)); do
		for s in "${SUBJECTS[@]}"; do
			run_cell "$w" "$s" "$rep"
		done
	done
done
T_END=$(date +%s)

HEADER+=$'\n'"- transports: layerfs ${LAYERFS_TRANSPORT:-not run} (its daemons' threads, every cell); fuse-overlayfs /dev/fuse; kernel and native in the kernel"
HEADER+=$'\n'"- measured in $(((T_END - T_START) / 60)) min $(((T_END - T_START) % 60)) s"
"$PY" "$HELPER" report "$RAW" --subjects "$(IFS=,; echo "${SUBJECTS[*]}")" --md "$OUT.md" --tsv "$OUT.tsv" \
	--header "$HEADER" --extra "$EXTRA"
cp "$LOG" "$OUT.log"
log "results: $OUT.md $OUT.tsv $OUT.raw.tsv $OUT.log"
exit 0
