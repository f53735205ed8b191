#!/usr/bin/env bash
# layerfs build benchmark: the rebuild loop of `layerfs build` against buildah (`buildah bud
# --layers`, kernel overlay storage) and Docker's BuildKit (the dockerd of docker.io, overlay2),
# on one generated "seeds-like" project: a package.json, an install step that writes thousands of
# files under node_modules/ after a sleep standing in for network time, ten thousand source
# files, a 200 MiB fixtures/ directory and a stale local node_modules/ that .dockerignore drops,
# a build step that reads every source file; ten steps (FROM, WORKDIR, COPY package.json, RUN
# install, COPY . ., RUN build, ENV, EXPOSE, USER, CMD).
#
#   sudo bash scripts/bench_build.sh [--quick] [--reps N] [--dir DIR] [--keep]
#                                    [--subjects layerfs,buildah,buildkit] [--out PREFIX]
#                                    [--no-build] [--timeout SECONDS]
#
# Five scenarios per repetition, every builder in each before the next scenario (the builders'
# order rotates from one repetition to the next), all reading the same context directory:
#   1 cold build: an empty store or cache (layerfs: a new --root; buildah: a new storage root;
#     BuildKit: a new dockerd data root), with only the base image loaded (untimed)
#   2 no-op rebuild   3 one source line changed   4 package.json changed   5 --no-cache build
# The time is the wall time of the build command alone, started after an untimed `sync` (so no
# builder writes back another one's data) (the page cache is not dropped: the
# context was just written, as in an edit-build loop; timing starts at least 60 s after the last
# mass deletion, which slows file creation on ext4 for about that long), with the CPU share that
# anything outside the run used meanwhile (a busy machine shows). Reported: medians, ratios to
# layerfs, the steps each builder says it took from its cache, and for layerfs the reason it
# printed for every step it ran (`[stage-0 N] running: REASON`) and how many steps mounted.
# An untimed probe under strace then counts the mounts and runc runs of a no-op and a one-line
# rebuild, to check that a cached step mounts nothing. Finally the three images' filesystems
# are listed (paths, types, modes, owners, sizes, contents, link targets; not times) and
# compared: "images identical: yes/no", every difference shown, the known ones explained.
#
# The base image is a busybox-static rootfs made here (no network), one layer tar from
# `layerfs diff` that every builder loads: layerfs import, buildah pull docker-archive:, docker
# load. Everything runs in a private mount namespace where /etc, /run, /var/lib and /var/cache
# are overlays whose upper directories live under DIR (buildah writes there whatever its
# configuration says, layerfs keeps its runc state in /run/layerfs, dockerd might: nothing of
# theirs reaches the host), with dockerd on its own socket and data root, buildah on its own
# storage and configuration, layerfs on its own --root: the host's docker, podman, buildah and
# layerfs storage are never touched. At exit (even on failure) dockerd is stopped by its pid,
# every mount under DIR is unmounted, leftover processes of the namespace are ended by pid, the
# fuse module's enable_uring is restored, and DIR is removed except DIR/results (the reports and
# build logs) unless --keep. Needs root; installs buildah, docker.io, runc, busybox-static,
# fuse3, strace and python3 with apt-get when missing.
#
# Benchmarks are not tests: nothing here asserts a time.

# The trap handlers and the per-builder functions are called indirectly.
# shellcheck disable=SC2317

set -uo pipefail
shopt -s nullglob
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
HELPER=$SCRIPT_DIR/bench_build_helper.py
ALL_SUBJECTS=(layerfs buildah buildkit)
SCENARIOS=(cold noop src manifest nocache)
declare -A SCEN_NAME=(
	[cold]="1 cold build"
	[noop]="2 no-op rebuild"
	[src]="3 one source line changed"
	[manifest]="4 package.json changed"
	[nocache]="5 --no-cache build"
)

usage() {
	cat <<EOF
usage: sudo bash scripts/bench_build.sh [options]

  --quick            a small project (1,000 source files, 300 installed files, 20 MiB of
                     fixtures) and 1 repetition: a smoke test
  --reps N           repetitions of the five scenarios (default 3; --quick: 1)
  --subjects S[,S..] builders, in this order (default: ${ALL_SUBJECTS[*]})
  --dir DIR          work directory (default /var/tmp/layerfs-bench-build); removed at the end
                     except DIR/results
  --out PREFIX       write PREFIX.md, PREFIX.tsv, PREFIX.raw.tsv, PREFIX.log and the build logs
                     in PREFIX.logs/ (default DIR/results/bench-build-DATE)
  --keep             keep DIR (stores, context, namespace uppers) for a post-mortem
  --no-build         do not run cargo build (use target/release/layerfs, or \$LAYERFS)
  --timeout S        limit for one build (default 900)

scenarios: cold build, no-op rebuild, one source line changed, package.json changed, --no-cache
EOF
}

# ------------------------------------------------------------------------------ options

DIR=/var/tmp/layerfs-bench-build
REPS=""
QUICK=0
SUBJECTS_ARG=""
OUT=""
KEEP=0
BUILD=1
TIMEOUT=900
ORIG_ARGS=("$@")
URING_PARAM=/sys/module/fuse/parameters/enable_uring

while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--reps) REPS=${2:?}; shift ;;
	--subjects) SUBJECTS_ARG=${2:?}; shift ;;
	--dir) DIR=${2:?}; shift ;;
	--out) OUT=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--no-build) BUILD=0 ;;
	--timeout) TIMEOUT=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "bench_build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

die() { echo "bench_build.sh: $*" >&2; exit 1; }
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; [[ -n ${LOG:-} ]] && printf '%s %s\n' "$(date +%T)" "$*" >>"$LOG"; return 0; }

[[ $REPS =~ ^[0-9]*$ && $TIMEOUT =~ ^[0-9]+$ ]] || die "--reps and --timeout take numbers"
if [[ -z $REPS ]]; then
	if ((QUICK)); then REPS=1; else REPS=3; fi
fi
((REPS >= 1)) || die "--reps must be at least 1"
((EUID == 0)) || die "needs root (mounts, runc, dockerd)"
[[ $DIR == /* ]] || DIR=$PWD/$DIR
[[ $DIR =~ ^[A-Za-z0-9/._+-]+$ ]] || die "--dir must be a plain path (letters, digits, / . _ + -)"
# dockerd's containerd socket lives under DIR: a unix socket path has at most 107 bytes
((${#DIR} <= 60)) || die "--dir is too long (at most 60 characters: sockets live under it)"
for d in /etc /run /var/lib /var/cache; do
	[[ $DIR == "$d" || $DIR == "$d"/* ]] && die "--dir cannot be under $d (covered by an overlay during the run)"
done
[[ $DIR == / || $DIR == /var || $DIR == /var/tmp || $DIR == /tmp ]] && die "--dir must be a directory of its own"

SUBJECTS=()
IFS=, read -r -a SUBJECTS <<<"${SUBJECTS_ARG:-$(IFS=,; echo "${ALL_SUBJECTS[*]}")}"
((${#SUBJECTS[@]})) || die "no subjects"
for s in "${SUBJECTS[@]}"; do
	[[ " ${ALL_SUBJECTS[*]} " == *" $s "* ]] || die "unknown subject: $s (known: ${ALL_SUBJECTS[*]})"
done
has_subject() { [[ " ${SUBJECTS[*]} " == *" $1 "* ]]; }

LAYERFS=${LAYERFS:-$REPO/target/release/layerfs}
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd

# ------------------------------------------------------------------------------ outside the namespace:
# tools, the layerfs binary, then the same script again in a private mount namespace

if [[ -z ${LFBB_IN_NS:-} ]]; then
	mkdir -p "$DIR/results" || die "cannot create $DIR"
	exec 9>"$DIR/.lock"
	flock -n 9 || die "another bench_build.sh is running on $DIR"
	need=()
	command -v python3 >/dev/null || need+=(python3)
	command -v unshare >/dev/null || need+=(util-linux)
	command -v runc >/dev/null || need+=(runc)
	command -v strace >/dev/null || need+=(strace)
	case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) need+=(busybox-static) ;; esac
	if has_subject layerfs; then command -v fusermount3 >/dev/null || need+=(fuse3); fi
	if has_subject buildah; then command -v buildah >/dev/null || need+=(buildah); fi
	if has_subject buildkit; then [[ -x $DOCKER && -x $DOCKERD ]] || need+=(docker.io); fi
	if ((${#need[@]})); then
		log "installing ${need[*]}"
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; } >"$DIR/results/apt.log" 2>&1 ||
			{ tail -5 "$DIR/results/apt.log" >&2; die "apt-get install ${need[*]} failed (see $DIR/results/apt.log)"; }
	fi
	case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) die "/bin/busybox is not static (install busybox-static)" ;; esac
	if has_subject layerfs && ((BUILD)); then
		CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
		log "building layerfs (cargo build --release in $REPO)"
		(cd "$REPO" && "$CARGO" build --release) >"$DIR/results/cargo-build.log" 2>&1 ||
			{ tail -5 "$DIR/results/cargo-build.log" >&2; die "cargo build --release failed"; }
	fi
	if has_subject layerfs; then [[ -x $LAYERFS ]] || die "no layerfs binary at $LAYERFS"; fi
	export LFBB_IN_NS=1
	# shellcheck disable=SC2093 # exec: signals sent to this pid reach the run itself
	exec unshare --mount --propagation private -- bash "$0" "${ORIG_ARGS[@]}"
	die "unshare --mount failed"
fi

# ------------------------------------------------------------------------------ in the namespace: set-up

URING_SAVED=""
[[ -w $URING_PARAM ]] && URING_SAVED=$(cat "$URING_PARAM")
STAMP=$(date +%Y%m%d-%H%M%S)
[[ -n $OUT ]] || OUT=$DIR/results/bench-build-$STAMP
[[ $OUT == /* ]] || OUT=$PWD/$OUT
mkdir -p "$(dirname "$OUT")" "$OUT.logs" || die "cannot create $OUT.logs"
LOG=$OUT.log
: >"$LOG"
BLOGS=$OUT.logs
RAW=$OUT.raw.tsv
EXTRA=$DIR/extra.md
NS=$DIR/ns
CTX=$DIR/project
PRISTINE=$DIR/pristine
BASE=$DIR/base
LSTORE=$DIR/layerfs-store
BH=$DIR/buildah
DK=$DIR/docker
DSOCK=$DK/docker.sock
DPID=""
STORAGE_DRIVER=""

mounts_under() { # mount points under $1 (deepest first), from our own namespace
	awk -v p="$1/" '{ m = $5; gsub(/\\040/, " ", m); if (index(m, p) == 1) print m }' /proc/self/mountinfo | sort -r
}
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }
unmount_under() { # unmount everything under DIR, deepest first (FUSE daemons exit with their mount)
	local m
	for m in $(mounts_under "$1"); do
		timeout 30 umount --no-canonicalize "$m" 2>>"$LOG" || timeout 30 umount --no-canonicalize -l "$m" 2>>"$LOG"
	done
}
wipe() { # remove DIR (nothing may stay mounted below it); mass deletions slow ext4 down for a while
	[[ -e $1 ]] || return 0
	unmount_under "$1"
	if [[ -n $(mounts_under "$1") ]]; then
		log "warning: not removing $1: something is still mounted below it"
		return 1
	fi
	rm -rf --one-file-system "$1"
	touch "$DIR/.last-mass-delete"
}
settle() { # ext4 (here with online discard) creates files slowly for about a minute after mass
	# deletions: wait that out before timing anything
	local age
	[[ -f $DIR/.last-mass-delete ]] || return 0
	age=$(($(date +%s) - $(stat -c %Y "$DIR/.last-mass-delete")))
	if ((age < 60)); then
		log "waiting $((60 - age)) s after the last mass deletion (ext4 creates files slowly until then)"
		sleep $((60 - age))
	fi
}
ns_procs() { # every other process in our mount namespace: all started by this script
	local d p
	for d in /proc/[0-9]*; do
		p=${d#/proc/}
		[[ $p == "$$" || $p == "$BASHPID" ]] && continue
		[[ $d/ns/mnt -ef /proc/$$/ns/mnt ]] && echo "$p"
	done
	return 0
}

stop_dockerd() {
	local i
	[[ -n $DPID ]] || return 0
	if [[ -d /proc/$DPID ]]; then
		kill -TERM "$DPID" 2>/dev/null
		for i in $(seq 100); do [[ -d /proc/$DPID ]] || break; sleep 0.2; done
		[[ -d /proc/$DPID ]] && { log "warning: dockerd ($DPID) did not stop in 20 s: killing it"; kill -KILL "$DPID" 2>/dev/null; }
	fi
	wait "$DPID" 2>/dev/null
	DPID=""
}

cleanup() {
	local rc=$? p left=""
	trap - EXIT INT TERM
	stop_dockerd
	if has_subject buildah && [[ -f ${CONTAINERS_STORAGE_CONF:-/nonexistent} ]]; then
		timeout 60 buildah rm -a >/dev/null 2>&1
	fi
	unmount_under "$DIR"
	for _ in $(seq 40); do left=$(ns_procs); [[ -z $left ]] && break; sleep 0.25; done
	if [[ -n $left ]]; then
		for p in $left; do log "ending leftover process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-150)"; done
		# shellcheck disable=SC2086,SC2046 # lists of pids
		{ kill $left; sleep 1; kill -9 $(ns_procs); } 2>/dev/null
	fi
	unmount_under "$DIR"
	for p in /var/cache /var/lib /run /etc; do
		awk -v m="$p" -v u="$NS" '$5 == m && index($0, u) { f = 1 } END { exit !f }' /proc/self/mountinfo &&
			{ umount "$p" 2>/dev/null || umount -l "$p"; }
	done
	[[ -n $URING_SAVED && $(cat "$URING_PARAM" 2>/dev/null) != "$URING_SAVED" ]] &&
		{ echo "$URING_SAVED" >"$URING_PARAM"; log "restored fuse enable_uring to $URING_SAVED"; }
	if ((KEEP)); then
		log "kept $DIR"
	else
		for p in "$DIR"/* "$DIR"/.[!.]*; do
			[[ $p == "$DIR/results" || $p == "$DIR/.lock" || $p == "$DIR/.last-mass-delete" || $OUT == "$p"/* ]] && continue
			rm -rf --one-file-system "$p"
		done
		touch "$DIR/.last-mass-delete"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Leftovers of a run that was killed: the namespace is gone, so nothing is mounted there.
for p in "$DIR"/*; do
	[[ $p == "$DIR/results" || $OUT == "$p"/* ]] && continue
	log "removing a leftover: $p"
	wipe "$p" || die "cannot clear $p"
done

# /etc, /run, /var/lib and /var/cache: overlays with private upper directories, seen only here.
for d in etc run var/lib var/cache; do
	mkdir -p "$NS/$d/u" "$NS/$d/w"
	mount -t overlay overlay -o "lowerdir=/$d,upperdir=$NS/$d/u,workdir=$NS/$d/w" "/$d" ||
		die "cannot cover /$d with an overlay"
done
mkdir -p "$DIR/tmp" "$DIR/home" "$DIR/xdg"
chmod 700 "$DIR/xdg"
export HOME=$DIR/home TMPDIR=$DIR/tmp XDG_RUNTIME_DIR=$DIR/xdg XDG_CONFIG_HOME=$DIR/home/.config XDG_DATA_HOME=$DIR/home/.local/share
unset DOCKER_HOST DOCKER_CONTEXT CONTAINER_HOST CONTAINER_CONNECTION BUILDAH_ISOLATION STORAGE_DRIVER STORAGE_OPTS LAYERFS_ROOT RUST_LOG

# ------------------------------------------------------------------------------ parameters

if ((QUICK)); then
	SRC_FILES=1000 SRC_DIRS=50 DEP_FILES=300 FIXTURES_MIB=20 LOCAL_MODULES=200
else
	SRC_FILES=10000 SRC_DIRS=300 DEP_FILES=3000 FIXTURES_MIB=200 LOCAL_MODULES=2000
fi
DEPS=40 SLEEP=2 SEED=42
EDIT_FILE=src/mod-000/file-00000.js
IMAGE=localhost/bench-app

# ------------------------------------------------------------------------------ the project and the base

log "generating the project in $CTX ($SRC_FILES source files in $SRC_DIRS dirs, install writes $DEP_FILES files after a ${SLEEP} s sleep, $FIXTURES_MIB MiB fixtures/ and $LOCAL_MODULES files in node_modules/ ignored)"
python3 "$HELPER" gen --ctx "$CTX" --seed "$SEED" --deps "$DEPS" --dep-files "$DEP_FILES" --sleep "$SLEEP" \
	--src-files "$SRC_FILES" --src-dirs "$SRC_DIRS" --fixtures-mib "$FIXTURES_MIB" --local-modules "$LOCAL_MODULES" \
	>"$DIR/gen.out" 2>>"$LOG" || die "generating the project failed"
mkdir -p "$PRISTINE/src-edit"
cp -p "$CTX/package.json" "$PRISTINE/"
cp -p "$CTX/$EDIT_FILE" "$PRISTINE/src-edit/"
PROJECT_DESC="$(du -sh --apparent-size "$CTX" | cut -f1) context: $SRC_FILES source files in $SRC_DIRS dirs ($(du -sh --apparent-size "$CTX/src" | cut -f1)), the install step writes $DEP_FILES files (after sleep $SLEEP, the stand-in for network time), fixtures/ $FIXTURES_MIB MiB and node_modules/ $LOCAL_MODULES files excluded by .dockerignore"

reset_context() { # the two files the scenarios change, as generated
	cp "$PRISTINE/package.json" "$CTX/package.json"
	cp "$PRISTINE/src-edit/${EDIT_FILE##*/}" "$CTX/$EDIT_FILE"
}
change_context() { # SCENARIO
	case $1 in
	src) sed -i "3s/.*/export function edited(x) { return helper(x, $RANDOM); }/" "$CTX/$EDIT_FILE" ;;
	manifest) python3 "$HELPER" manifest --deps "$DEPS" --extra "dep-added-$RANDOM" >"$CTX/package.json" ;;
	esac
}

# One rootfs, one layer tar (layerfs diff), loaded into every builder.
log "making the base image from busybox-static"
rootfs=$BASE/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,root,home/app} "$BASE/arch"
cp /bin/busybox "$rootfs/bin/"
for f in $(/bin/busybox --list); do [[ $f == busybox ]] || ln -s busybox "$rootfs/bin/$f"; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
chmod 700 "$rootfs/root"
chown 1000:1000 "$rootfs/home/app"
BASE_LAYER=$BASE/arch/layer.tar
BASE_ARCHIVE=$BASE/base-docker-archive.tar
if has_subject layerfs; then
	"$LAYERFS" diff "$rootfs" -o "$BASE_LAYER" >/dev/null 2>>"$LOG" || die "layerfs diff of the base failed"
else
	tar --numeric-owner --sort=name --mtime=@1700000000 -C "$rootfs" -cf "$BASE_LAYER" . || die "tar of the base failed"
fi
diff_id=sha256:$(sha256sum <"$BASE_LAYER" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","created":"2023-11-14T22:13:20Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created":"2023-11-14T22:13:20Z","created_by":"bench_build.sh: busybox-static"}]}' \
	"$diff_id" >"$BASE/arch/config.json"
printf '[{"Config":"config.json","RepoTags":["localhost/bbase:latest"],"Layers":["layer.tar"]}]' >"$BASE/arch/manifest.json"
tar -C "$BASE/arch" -cf "$BASE_ARCHIVE" manifest.json config.json layer.tar || die "making the docker-archive failed"

# ------------------------------------------------------------------------------ the builders
# reset_S: an empty store with the base image (untimed); build_S MODE LOGFILE: the timed command
# (MODE nocache adds --no-cache); info_S: one line for the report.

lfs() { timeout -k 10 "$TIMEOUT" "$LAYERFS" --root "$LSTORE" "$@"; }
reset_layerfs() {
	wipe "$LSTORE" || return 1
	lfs import "$BASE_LAYER" --name localhost/bbase >/dev/null
}
build_layerfs() {
	local -a nc=()
	[[ $1 == nocache ]] && nc=(--no-cache)
	lfs build --progress plain "${nc[@]}" -f "$CTX/Dockerfile" -t "$IMAGE" "$CTX" >"$2" 2>&1
}
info_layerfs() { echo "layerfs: $("$LAYERFS" --version 2>&1 | head -1) ($LAYERFS), store $LSTORE"; }

if has_subject buildah; then
	mkdir -p "$BH/etc"
	export CONTAINERS_STORAGE_CONF=$BH/etc/storage.conf CONTAINERS_CONF=$BH/etc/containers.conf
	export CONTAINERS_REGISTRIES_CONF=$BH/etc/registries.conf REGISTRY_AUTH_FILE=$BH/etc/auth.json
	POLICY=$BH/etc/policy.json
	printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' "$BH/root" "$BH/run" >"$CONTAINERS_STORAGE_CONF"
	# the runtime cannot raise limits above our hard ones; buildah would ask for 1048576
	NOFILE=$(ulimit -Hn); [[ $NOFILE == unlimited ]] && NOFILE=1048576; ((NOFILE > 65536)) && NOFILE=65536
	NPROC=$(ulimit -Hu); [[ $NPROC == unlimited ]] && NPROC=4194304; ((NPROC > 32768)) && NPROC=32768
	cat >"$CONTAINERS_CONF" <<-EOF
		[containers]
		default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
		netns = "none"
		[engine]
		runtime = "runc"
		cgroup_manager = "cgroupfs"
		events_logger = "file"
		events_logfile_path = "$BH/events.log"
		tmp_dir = "$BH/libpod"
		image_copy_tmp_dir = "$DIR/tmp"
	EOF
	printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' >"$CONTAINERS_REGISTRIES_CONF"
	echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$POLICY"
	echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"
fi
bh() { timeout -k 10 "$TIMEOUT" buildah "$@"; }
reset_buildah() {
	bh rm -a >/dev/null 2>>"$LOG"
	{ wipe "$BH/root" && wipe "$BH/run"; } || return 1
	bh pull --signature-policy "$POLICY" "docker-archive:$BASE_ARCHIVE" >/dev/null 2>>"$LOG"
}
build_buildah() {
	local -a nc=()
	[[ $1 == nocache ]] && nc=(--no-cache)
	bh bud --layers "${nc[@]}" --isolation oci --network none --pull=never --signature-policy "$POLICY" \
		-f "$CTX/Dockerfile" -t "$IMAGE" "$CTX" >"$2" 2>&1
}
info_buildah() { echo "buildah: $(buildah --version 2>&1) (bud --layers --isolation oci, runc, cgroupfs), storage driver overlay (kernel), root $BH/root"; }

dk() { DOCKER_HOST=unix://$DSOCK DOCKER_BUILDKIT=1 DOCKER_CONFIG=$DK/config timeout -k 10 "$TIMEOUT" "$DOCKER" "$@"; }
start_dockerd() { # on its own socket, data root and exec root; no networking set-up at all
	local drv i
	for drv in overlay2 vfs; do
		mkdir -p "$DK/config"
		"$DOCKERD" --host "unix://$DSOCK" --data-root "$DK/data" --exec-root "$DK/exec" --pidfile "$DK/docker.pid" \
			--storage-driver "$drv" --iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false \
			--userland-proxy=false --log-level warn >>"$DK/dockerd.log" 2>&1 &
		DPID=$!
		for i in $(seq 150); do
			dk version >/dev/null 2>&1 && break
			[[ -d /proc/$DPID ]] || break
			sleep 0.2
		done
		if dk version >/dev/null 2>&1; then
			STORAGE_DRIVER=$drv
			return 0
		fi
		log "dockerd did not start with --storage-driver $drv: $(tail -1 "$DK/dockerd.log")"
		stop_dockerd
		wipe "$DK/data"
		wipe "$DK/exec"
	done
	return 1
}
reset_buildkit() {
	stop_dockerd
	{ wipe "$DK/data" && wipe "$DK/exec"; } || return 1
	start_dockerd || return 1
	dk load -i "$BASE_ARCHIVE" >/dev/null 2>>"$LOG"
}
build_buildkit() {
	local -a nc=()
	[[ $1 == nocache ]] && nc=(--no-cache)
	dk build --progress plain "${nc[@]}" --network none -f "$CTX/Dockerfile" -t "$IMAGE" "$CTX" >"$2" 2>&1
}
info_buildkit() { echo "BuildKit: dockerd $("$DOCKERD" --version 2>&1 | awk '{ print $3 }' | tr -d ,) (docker.io, BuildKit built in; DOCKER_BUILDKIT=1 $DOCKER build --network none), storage driver ${STORAGE_DRIVER:-not started}, containerd and runc as dockerd runs them"; }

# ------------------------------------------------------------------------------ one build

ELAPSED=""
t_cmd() { # ELAPSED = wall seconds of the command
	local t0 t1 rc us
	t0=$EPOCHREALTIME
	"$@"
	rc=$?
	t1=$EPOCHREALTIME
	us=$((${t1/./} - ${t0/./}))
	ELAPSED=$(printf '%d.%06d' $((us / 1000000)) $((us % 1000000)))
	return "$rc"
}

# CPU ticks: BUSY_ALL/TOTAL_ALL over all CPUs (steal counts as busy: time taken by other guests)
# and OWN: every process of this run's mount namespace (dockerd, its builds and the layerfs and
# buildah processes included), with the children they reaped
cpu_sample() {
	local _c u n s i w q sq st d line
	local -a f
	read -r _c u n s i w q sq st _ </proc/stat
	BUSY_ALL=$((u + n + s + q + sq + st))
	TOTAL_ALL=$((BUSY_ALL + i + w))
	OWN=0
	for d in /proc/[0-9]*; do
		[[ $d/ns/mnt -ef /proc/$$/ns/mnt ]] || continue
		read -r line <"$d/stat" 2>/dev/null || continue
		read -r -a f <<<"${line##*) }"
		OWN=$((OWN + f[11] + f[12] + f[13] + f[14]))
	done
}
other_cpu() { # B0 T0 O0 B1 T1 O1: percent of the machine's CPU time used by anything else
	local total=$(($5 - $2)) other=$((($4 - $1) - ($6 - $3)))
	((total > 0)) || { echo 0; return; }
	((other > 0)) || other=0
	echo $((100 * other / total))
}

NBUILDS=0
NDONE=0
run_build() { # SCENARIO SUBJECT REP
	local scen=$1 subj=$2 rep=$3 mode=normal out val parsed cached total mounted note b0 t0 o0 other
	[[ $scen == nocache ]] && mode=nocache
	out=$BLOGS/r$rep-$scen-$subj.log
	NDONE=$((NDONE + 1))
	# Untimed: write back what the previous builds left dirty, so no builder pays for another
	# one's data (a builder that syncs, like layerfs, would otherwise flush it in its time).
	sync
	cpu_sample
	b0=$BUSY_ALL t0=$TOTAL_ALL o0=$OWN
	if t_cmd "build_$subj" "$mode" "$out"; then
		val=$ELAPSED
	else
		val=FAIL
	fi
	cpu_sample
	other=$(other_cpu "$b0" "$t0" "$o0" "$BUSY_ALL" "$TOTAL_ALL" "$OWN")
	parsed=$(python3 "$HELPER" parse "$subj" "$out")
	IFS=$'\x1f' read -r cached total mounted note <<<"$parsed"
	if [[ $val == FAIL ]]; then
		note="exit status: $(grep -v '^\s*$' "$out" | tail -1 | tr '\t' ' ' | cut -c1-160)"
		cat "$out" >>"$LOG"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${SCEN_NAME[$scen]}" "$subj" "$rep" "$val" "$cached" "$total" "$mounted" "$other" "$note" >>"$RAW"
	log "[$NDONE/$NBUILDS] rep $rep ${SCEN_NAME[$scen]}, $subj: $val s, cached $cached/$total${mounted:+, mounted $mounted}, other CPU $other%"
}

# ------------------------------------------------------------------------------ run

printf '#scenario\tsubject\trep\tseconds\tcached\ttotal\tmounted\tother_cpu_pct\tnote\n' >"$RAW"
: >"$EXTRA"
NBUILDS=$((REPS * ${#SCENARIOS[@]} * ${#SUBJECTS[@]}))
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$(date +%s)
for ((rep = 1; rep <= REPS; rep++)); do
	order=()
	for ((i = 0; i < ${#SUBJECTS[@]}; i++)); do order+=("${SUBJECTS[(i + rep - 1) % ${#SUBJECTS[@]}]}"); done
	reset_context
	for s in "${order[@]}"; do
		log "rep $rep: an empty store for $s, with the base image"
		"reset_$s" || die "could not reset $s (see $LOG)"
	done
	settle
	for scen in "${SCENARIOS[@]}"; do
		change_context "$scen"
		for s in "${order[@]}"; do run_build "$scen" "$s" "$rep"; done
	done
done
T_END=$(date +%s)

# ------------------------------------------------------------------------------ the images' files

COMPARE=$OUT.compare.txt
: >"$COMPARE"
lists=()
origins=()
nlisted=0
mkdir -p "$DIR/export"
for s in "${SUBJECTS[@]}"; do
	lst=$DIR/export/$s.list
	case $s in
	layerfs)
		mkdir -p "$DIR/export/layerfs-mnt"
		if lfs mount --image "$IMAGE" "$DIR/export/layerfs-mnt" 2>>"$LOG"; then
			python3 "$HELPER" listing "$DIR/export/layerfs-mnt" >"$lst" 2>>"$LOG" || log "listing the layerfs image failed"
			timeout 60 "$LAYERFS" umount "$DIR/export/layerfs-mnt" 2>>"$LOG" || unmount_under "$DIR/export"
		else
			log "layerfs mount --image $IMAGE failed"
		fi
		;;
	buildah)
		ctr=""
		if ctr=$(bh from --pull=never --name bench-compare "$IMAGE" 2>>"$LOG") && mnt=$(bh mount "$ctr" 2>>"$LOG"); then
			python3 "$HELPER" listing "$mnt" >"$lst" 2>>"$LOG" || log "listing the buildah image failed"
		else
			log "buildah from/mount of $IMAGE failed"
		fi
		[[ -n $ctr ]] && { bh umount "$ctr" >/dev/null 2>&1; bh rm "$ctr" >/dev/null 2>&1; }
		# which layer holds what: tells the image's own files from those of the container
		bh push --signature-policy "$POLICY" "$IMAGE" "docker-archive:$DIR/export/buildah-image.tar:$IMAGE" >/dev/null 2>>"$LOG" &&
			python3 "$HELPER" layermap "$DIR/export/buildah-image.tar" >"$DIR/export/$s.layers" 2>>"$LOG"
		;;
	buildkit)
		mkdir -p "$DIR/export/buildkit-root"
		if dk create --name bench-compare "$IMAGE" >/dev/null 2>>"$LOG" &&
			dk export bench-compare | tar -x --numeric-owner -p -C "$DIR/export/buildkit-root"; then
			python3 "$HELPER" listing "$DIR/export/buildkit-root" >"$lst" 2>>"$LOG" || log "listing the BuildKit image failed"
		else
			log "docker create/export of $IMAGE failed"
		fi
		dk rm -f bench-compare >/dev/null 2>&1
		dk save -o "$DIR/export/buildkit-image.tar" "$IMAGE" 2>>"$LOG" &&
			python3 "$HELPER" layermap "$DIR/export/buildkit-image.tar" >"$DIR/export/$s.layers" 2>>"$LOG"
		;;
	esac
	if [[ -s $lst ]]; then
		lists+=("$s=$lst")
		nlisted=$((nlisted + 1))
	fi
	[[ -s $DIR/export/$s.layers ]] && origins+=(--origin "$s=$DIR/export/$s.layers")
done
if ((nlisted >= 2)); then
	python3 "$HELPER" compare "${lists[@]}" "${origins[@]}" >"$COMPARE" 2>>"$LOG"
	(($? == 0 || $? == 3)) || echo "images identical: not known (the comparison failed: see $LOG)" >>"$COMPARE"
	cp "$DIR"/export/*.list "$DIR"/export/*.layers "$BLOGS/" 2>/dev/null
else
	echo "images identical: not compared (${nlisted} image(s) listed: the comparison needs two builders)" >"$COMPARE"
fi
{
	echo "Image contents after the last build (--no-cache, package.json changed), layerfs: \`layerfs mount --image\`; buildah: \`buildah from\` + \`buildah mount\`; BuildKit: \`docker create\` + \`docker export\` (so the files of docker's container init layer show). Where a differing entry comes from is read from the image's own layers (\`buildah push docker-archive:\`, \`docker save\`). Listings in $BLOGS/*.list, layer maps in $BLOGS/*.layers."
	echo
	sed 's/^\(images identical:.*\)$/**\1**/' "$COMPARE"
} >>"$EXTRA"

# ------------------------------------------------------------------------------ mount probe (untimed)

if has_subject layerfs; then
	PROBE=$DIR/probe
	mkdir -p "$PROBE"
	probe() { # NAME: one layerfs build under strace; MOUNTS and RUNCS it started
		rm -f "$PROBE/$1".*
		strace -f -qq -ff -e trace=execve -e signal=none -s 48 -o "$PROBE/$1" \
			"$LAYERFS" --root "$LSTORE" build --progress plain -f "$CTX/Dockerfile" -t "$IMAGE" "$CTX" >"$BLOGS/probe-$1.log" 2>&1
		MOUNTS=$(cat "$PROBE/$1".* | grep -E '^execve\("[^"]*", \["[^"]*"(\.\.\.)?, "mount"' | grep -c ' = 0$')
		RUNCS=$(cat "$PROBE/$1".* | grep -E '^execve\("[^"]*/runc"' | grep -c ' = 0$')
		LAYERS=$(grep -c '\] done in .*, layer ' "$BLOGS/probe-$1.log")
	}
	if command -v strace >/dev/null; then
		probe noop
		p1="no-op rebuild: $MOUNTS layerfs mounts, $RUNCS runc runs ($LAYERS steps made a layer)"
		change_context src
		probe src
		p2="one source line changed: $MOUNTS layerfs mounts, $RUNCS runc runs ($LAYERS steps made a layer)"
		{
			echo
			echo "Mount probe (layerfs, untimed, under \`strace -f -e trace=execve\`, after the runs): $p1; $p2. A step that made a layer ran in a layerfs mount of its own; cached steps and config-only steps (ENV, EXPOSE, USER, CMD) mount nothing."
		} >>"$EXTRA"
		log "probe: $p1; $p2"
	fi
fi

# ------------------------------------------------------------------------------ report

git_commit=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD 2>/dev/null || git_commit+=" (with uncommitted changes)"
HEADER=$(
	echo "# layerfs build benchmark, $(date '+%Y-%m-%d %H:%M %Z')"
	echo
	echo "- commit: $git_commit ($REPO)"
	for s in "${SUBJECTS[@]}"; do echo "- $("info_$s")"; done
	echo "- runc: $(runc --version 2>/dev/null | head -1); kernel: $(uname -r); CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) x $(nproc); memory: $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
	echo "- fuse.enable_uring at the start: ${URING_SAVED:-absent} (layerfs mounts may turn it on; restored at exit)"
	echo "- work dir: $DIR on $(findmnt -no FSTYPE,SOURCE,OPTIONS -T "$DIR" | tr -s ' ' ' ')"
	echo "- project: $PROJECT_DESC; 10 steps: FROM, WORKDIR, COPY package.json, RUN install, COPY . ., RUN build, ENV, EXPOSE, USER, CMD"
	echo "- runs: $REPS repetition(s) of the five scenarios; in each scenario every builder builds the same context, in an order that rotates per repetition; cold = a new store/storage/data root with only the base image; page cache not dropped"
	echo "- measured in $(((T_END - T_START) / 60)) min $(((T_END - T_START) % 60)) s (builds, resets and waits); load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
)
how=()
has_subject layerfs && how+=("layerfs counts the 9 steps after FROM (its summary line)")
has_subject buildah && how+=("buildah the 9 steps after FROM (\`--> Using cache\`)")
has_subject buildkit && how+=("BuildKit only its 5 filesystem steps after FROM (\`#N CACHED\`; ENV, EXPOSE, USER and CMD are no steps in BuildKit)")
{
	echo
	echo "Cached steps: $(printf '%s, ' "${how[@]}" | sed 's/, $//'). Build logs: $BLOGS/."
} >>"$EXTRA"
python3 "$HELPER" report "$RAW" --subjects "$(IFS=,; echo "${SUBJECTS[*]}")" --md "$OUT.md" --tsv "$OUT.tsv" \
	--header "$HEADER" --extra "$EXTRA" || die "the report failed (raw results in $RAW)"
log "results: $OUT.md $OUT.tsv $OUT.raw.tsv $OUT.log $BLOGS/"
exit 0
