#!/usr/bin/env bash
# Registry benchmark: `layerfs push` and `layerfs pull` against `skopeo copy` between the same
# store and the same registry (Debian's docker-registry, the distribution server, on loopback).
#
#   sudo bash scripts/bench_registry.sh [--reps N] [--size MB] [--layers N] [--dir PARENT]
#                                       [--out PREFIX] [--keep] [--no-build] [--timeout S]
#
# The image is made here (no network): a busybox-static base layer, then --layers layers of
# --size MB in all (70% random bytes, 30% text that gzip shrinks about 3x; layer sizes vary so
# some blobs go up in one PUT and others in chunks), each committed with `layerfs commit`
# (gzip) into a new layerfs store. The store is an OCI image layout, so skopeo reads the same
# image as oci:STORE:NAME.
#
# Each repetition starts a new docker-registry (temporary config and storage, a free loopback
# port, access log on) and measures, in an order that rotates from one repetition to the next:
#   push        into an empty repository: `layerfs push` / `skopeo copy oci:STORE:NAME docker://`
#   pull        into an empty destination: `layerfs pull` into a new store (downloads, checks
#               and extracts every layer), `skopeo copy` into a new OCI layout (downloads only)
#               and into a new containers-storage root with the overlay driver (extracts too)
#   push again  of the image the registry already holds (to the same repository)
# Before every timed command: sync and drop the page cache. The time is the command's wall
# time; the `sync` right after it is timed too (what it left unwritten), as "+sync". The
# registry's access log gives the requests of every command (method and kind of path). The
# pulled copies and the registry's data are removed between repetitions, and the next one
# waits until 45 s after that (ext4 with online discard creates files slowly for a while after
# a mass deletion).
#
# Everything lives under a mktemp directory in PARENT (default /var/tmp), in a private mount
# namespace where skopeo's blob-info cache (/var/lib/containers/cache, when the host has one)
# is a directory of the run (empty at the start: no cross-repository mounts learnt elsewhere;
# the host's is not touched). Every repetition's registry has a new port, so neither tool
# mounts blobs from the repositories of an earlier one. At exit (even on failure) the registry is killed by its pid, anything mounted
# under the directory is unmounted and the directory is removed (unless --keep).
#
# Benchmarks are not tests: nothing here asserts a time.

# The trap handler is called indirectly.
# shellcheck disable=SC2317

set -uo pipefail
shopt -s nullglob
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
	cat <<EOF
usage: sudo bash scripts/bench_registry.sh [options]

  --reps N        repetitions (default 3)
  --size MB       the image's layers, uncompressed, in all (default 500)
  --layers N      layers on top of the busybox base (default 20)
  --dir PARENT    where the temporary directory goes (default /var/tmp)
  --out PREFIX    also write the report to PREFIX.md and the raw times to PREFIX.raw.tsv
  --keep          keep the temporary directory (stores, registry data, logs)
  --no-build      do not run cargo build --release (use target/release/layerfs, or \$LAYERFS)
  --timeout S     limit for one command (default 900)
EOF
}

REPS=3
SIZE=500
LAYERS=20
PARENT=/var/tmp
OUT=""
KEEP=0
BUILD=1
TIMEOUT=900
ORIG_ARGS=("$@")

while (($#)); do
	case $1 in
	--reps) REPS=${2:?}; shift ;;
	--size) SIZE=${2:?}; shift ;;
	--layers) LAYERS=${2:?}; shift ;;
	--dir) PARENT=${2:?}; shift ;;
	--out) OUT=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--no-build) BUILD=0 ;;
	--timeout) TIMEOUT=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "bench_registry.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

# fd 4: the script's stderr, also from a trap that runs while a command's output is redirected
exec 4>&2
die() { echo "bench_registry.sh: $*" >&4; exit 1; }
log() { printf '%s %s\n' "$(date +%T)" "$*" >&4; }

for n in "$REPS" "$SIZE" "$LAYERS" "$TIMEOUT"; do
	[[ $n =~ ^[0-9]+$ ]] || die "--reps, --size, --layers and --timeout take numbers"
done
((REPS >= 1 && SIZE >= 1 && LAYERS >= 1)) || die "--reps, --size and --layers must be at least 1"
((EUID == 0)) || die "needs root (drop_caches, containers-storage with the overlay driver)"
[[ $OUT == "" || $OUT == /* ]] || OUT=$PWD/$OUT
LAYERFS=${LAYERFS:-$REPO/target/release/layerfs}

# ------------------------------------------------------------------------------ outside: tools,
# the binary, then the same script again in a private mount namespace

if [[ -z ${LFBR_IN_NS:-} ]]; then
	need=()
	command -v docker-registry >/dev/null || need+=(docker-registry)
	command -v skopeo >/dev/null || need+=(skopeo)
	command -v python3 >/dev/null || need+=(python3)
	command -v unshare >/dev/null || need+=(util-linux)
	case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) need+=(busybox-static) ;; esac
	if ((${#need[@]})); then
		log "installing ${need[*]}"
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; } >/dev/null 2>&1 ||
			die "apt-get install ${need[*]} failed"
	fi
	if ((BUILD)); then
		log "building layerfs (cargo build --release in $REPO)"
		(cd "$REPO" && "$(command -v cargo || echo "$HOME/.cargo/bin/cargo")" build --release --quiet) ||
			die "cargo build --release failed"
	fi
	[[ -x $LAYERFS ]] || die "no layerfs binary at $LAYERFS (build it, or set \$LAYERFS)"
	export LFBR_IN_NS=1 LAYERFS
	# shellcheck disable=SC2093 # exec: signals sent to this pid reach the run itself
	exec unshare --mount --propagation private -- bash "$0" "${ORIG_ARGS[@]}"
	die "unshare --mount failed"
fi

# ------------------------------------------------------------------------------ in the namespace

mkdir -p "$PARENT" || die "cannot create $PARENT"
WORK=$(mktemp -d "$PARENT/layerfs-bench-registry.XXXXXX") || die "mktemp in $PARENT failed"
REG_PID=""
REG_LOG=""
PORT=""

stop_registry() {
	[[ -n $REG_PID ]] || return 0
	kill -TERM "$REG_PID" 2>/dev/null
	for _ in $(seq 50); do [[ -d /proc/$REG_PID ]] || break; sleep 0.1; done
	[[ -d /proc/$REG_PID ]] && kill -KILL "$REG_PID" 2>/dev/null
	wait "$REG_PID" 2>/dev/null
	REG_PID=""
}
mounts_under() { # mount points under $1, deepest first
	awk -v p="$1/" '{ m = $5; gsub(/\\040/, " ", m); if (index(m, p) == 1) print m }' /proc/self/mountinfo | sort -r
}
unmount_under() {
	local m
	for m in $(mounts_under "$1"); do
		umount --no-canonicalize "$m" 2>/dev/null || umount --no-canonicalize -l "$m"
	done
}
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	stop_registry
	[[ $(awk '$5 == "/var/lib/containers/cache"' /proc/self/mountinfo) ]] && umount /var/lib/containers/cache
	unmount_under "$WORK"
	if ((KEEP)); then
		log "kept $WORK"
	else
		rm -rf --one-file-system "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# skopeo keeps what it learnt about blobs (where it pushed them) in /var/lib/containers/cache
# when run by root: here that is a directory of the run, empty at the start.
if [[ -d /var/lib/containers/cache ]]; then
	mkdir -p "$WORK/blob-info-cache"
	mount --bind "$WORK/blob-info-cache" /var/lib/containers/cache || die "cannot bind-mount skopeo's blob-info cache"
fi
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$WORK/policy.json"
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' "$WORK/cs-default/root" "$WORK/cs-default/run" >"$WORK/storage.conf"
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
skopeo() { timeout -k 10 "$TIMEOUT" /usr/bin/skopeo --policy "$WORK/policy.json" "$@"; }
lfs() { # STORE ARGS...
	local root=$1
	shift
	timeout -k 10 "$TIMEOUT" "$LAYERFS" --root "$root" -q "$@"
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}
LAST_DELETE=0
settle() { # ext4 with online discard creates files slowly for a while after mass deletions
	local age=$(($(date +%s) - LAST_DELETE))
	if ((age < 45)); then
		log "waiting $((45 - age)) s after the last mass deletion"
		sleep $((45 - age))
	fi
}
wipe() {
	[[ -e $1 ]] || return 0
	unmount_under "$1"
	rm -rf --one-file-system "$1"
	LAST_DELETE=$(date +%s)
}

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
start_registry() { # a new docker-registry on a free port with empty storage, as tests/registry.rs
	local dir=$WORK/registry i
	stop_registry
	wipe "$dir"
	mkdir -p "$dir"
	PORT=$(free_port)
	REG_LOG=$dir/registry.log
	cat >"$dir/config.yml" <<-EOF
		version: 0.1
		log:
		  level: error
		  accesslog:
		    disabled: false
		storage:
		  filesystem:
		    rootdirectory: $dir/data
		  delete:
		    enabled: true
		http:
		  addr: 127.0.0.1:$PORT
	EOF
	docker-registry serve "$dir/config.yml" >"$REG_LOG" 2>&1 &
	REG_PID=$!
	for i in $(seq 200); do
		(: </dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && return 0
		[[ -d /proc/$REG_PID ]] || break
		sleep 0.1
	done
	tail -5 "$REG_LOG" >&2
	die "docker-registry did not start"
}

# Requests in the access log since line $1, by kind: "blob HEAD 21, manifest PUT 1, ..."
requests_since() {
	tail -n +"$(($1 + 1))" "$REG_LOG" | awk '
		match($0, /"(GET|HEAD|PUT|PATCH|POST|DELETE) \/v2\/[^ ]*/) {
			split(substr($0, RSTART + 1, RLENGTH - 1), a, " ")
			p = a[2]
			k = "other"
			if (p ~ /\/blobs\/uploads\//) k = "upload"
			else if (p ~ /\/blobs\//) k = "blob"
			else if (p ~ /\/manifests\//) k = "manifest"
			n[k " " a[1]]++
			total++
		}
		END {
			s = ""
			for (x in n) s = s (s == "" ? "" : ", ") x " " n[x]
			printf "%d requests: %s\n", total, s
		}'
}
log_lines() { wc -l <"$REG_LOG"; }

# ------------------------------------------------------------------------------ the image

STORE=$WORK/store
IMAGE=bench
log "making the image: busybox base + $LAYERS layers, $SIZE MB in all (in $WORK)"
rootfs=$WORK/gen/base
mkdir -p "$rootfs"/{bin,etc,tmp,root,home/app}
cp /bin/busybox "$rootfs/bin/busybox"
for f in sh ls cat echo mkdir touch id sleep wc sed ip stat true false test hostname head sort; do
	ln -s busybox "$rootfs/bin/$f"
done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
# committed like the other layers (gzip): an uncompressed layer is one skopeo would compress
# on its way to the registry, and the two pushers would no longer push the same image
lfs "$STORE" commit "$rootfs" --from scratch --name bench-base >/dev/null || die "layerfs commit of the base failed"
python3 - "$WORK/gen" "$LAYERS" "$SIZE" <<'PY' || die "generating the layers failed"
import os, random, sys
out, layers, size_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(19)
# Layer sizes vary 1x-5x; about 70% random bytes, 30% text (words of a small vocabulary).
weights = [1 + (i * 7) % 5 for i in range(layers)]
total = size_mb * 1000 * 1000
words = [''.join(rnd.choice('abcdefghijklmnopqrstuvwxyz_') for _ in range(rnd.randint(2, 10)))
         for _ in range(400)]
pool = []
n = 0
while n < 4 << 20:
    line = ' '.join(rnd.choice(words) for _ in range(rnd.randint(3, 14))) + '\n'
    pool.append(line)
    n += len(line)
pool = ''.join(pool).encode()
for i, w in enumerate(weights):
    budget = total * w // sum(weights)
    top = os.path.join(out, 'l%02d' % (i + 1), 'opt', 'layer%02d' % (i + 1))
    for d in ('bin', 'data', 'share/doc'):
        os.makedirs(os.path.join(top, d))
    rand_left = budget * 7 // 10
    text_left = budget - rand_left
    # one big binary (half the random bytes), then files of 16 KiB - 2 MiB
    with open(os.path.join(top, 'bin', 'big.bin'), 'wb') as f:
        f.write(os.urandom(rand_left // 2))
    rand_left -= rand_left // 2
    k = 0
    while rand_left > 0:
        n = min(rand_left, rnd.randint(16 << 10, 2 << 20))
        with open(os.path.join(top, 'data', 'blob%04d' % k), 'wb') as f:
            f.write(os.urandom(n))
        rand_left -= n
        k += 1
    k = 0
    while text_left > 0:
        n = min(text_left, rnd.randint(1 << 10, 256 << 10))
        off = rnd.randint(0, len(pool) - n)
        with open(os.path.join(top, 'share/doc', 'text%04d.txt' % k), 'wb') as f:
            f.write(pool[off:off + n])
        text_left -= n
        k += 1
PY
parent=bench-base
for ((i = 1; i <= LAYERS; i++)); do
	name=bench-l$i
	((i == LAYERS)) && name=$IMAGE
	lfs "$STORE" commit "$WORK/gen/l$(printf %02d "$i")" --from "$parent" --name "$name" >/dev/null ||
		die "layerfs commit of layer $i failed"
	parent=$name
done
IMAGE_DIGEST=$(python3 - "$STORE" "$IMAGE" <<'PY'
import json, sys
idx = json.load(open(sys.argv[1] + '/index.json'))
for m in idx['manifests']:
    if m.get('annotations', {}).get('org.opencontainers.image.ref.name') == sys.argv[2]:
        print(m['digest'])
PY
)
[[ $IMAGE_DIGEST == sha256:* ]] || die "cannot find $IMAGE in the store's index.json"
IMAGE_DESC=$(python3 - "$STORE" "$IMAGE_DIGEST" <<'PY'
import json, sys
store, d = sys.argv[1], sys.argv[2]
m = json.load(open('%s/blobs/sha256/%s' % (store, d.split(':')[1])))
sizes = [l['size'] for l in m['layers']]
print('%d layers (busybox base + %d), %.0f MB compressed (gzip -1; largest layer %.1f MB, smallest %.2f MB)' % (
    len(sizes), len(sizes) - 1, sum(sizes) / 1e6, max(sizes) / 1e6, min(sizes) / 1e6))
PY
)
UNPACKED=$(du -sm --apparent-size "$WORK/gen" | cut -f1)
log "image $IMAGE: $IMAGE_DESC, $UNPACKED MB unpacked ($IMAGE_DIGEST)"

# ------------------------------------------------------------------------------ the runs

RAW=$WORK/raw.tsv
REQS=$WORK/requests.tsv
printf '#rep\trow\tsubject\tseconds\tsync_seconds\n' >"$RAW"
: >"$REQS"
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
CS_OK=1
CS_WHY=""
DIGESTS=$WORK/digests
: >"$DIGESTS"

# measure REP ROW SUBJECT CMD...: drop caches, time the command, then its sync; record both
# and the requests the registry saw
measure() {
	local rep=$1 row=$2 subj=$3 mark val sync_s out=$WORK/out.txt
	shift 3
	drop_caches
	mark=$(log_lines)
	if t_cmd "$@" >"$out" 2>&1; then
		val=$ELAPSED
		t_cmd sync
		sync_s=$ELAPSED
	else
		val=FAIL
		sync_s=FAIL
		log "$row, $subj failed: $(tail -3 "$out" | tr '\n' ' ')"
	fi
	sleep 0.2 # the access log line of the last request
	printf '%s\t%s\t%s\t%s\t%s\n' "$rep" "$row" "$subj" "$val" "$sync_s" >>"$RAW"
	printf '%s\t%s\t%s\n' "$row" "$subj" "$(requests_since "$mark")" >>"$REQS"
	log "rep $rep $row, $subj: $val s (+sync $sync_s s); $(requests_since "$mark")"
	[[ $val != FAIL ]]
}

push_layerfs() { lfs "$STORE" push "$IMAGE" "127.0.0.1:$PORT/$1:bench" --tls-verify=false >"$WORK/digest-lfs"; }
push_skopeo() {
	skopeo copy --quiet --dest-tls-verify=false --digestfile "$WORK/digest-sko" \
		"oci:$STORE:$IMAGE" "docker://127.0.0.1:$PORT/$1:bench"
}
pull_layerfs() { lfs "$WORK/pull/store" pull "127.0.0.1:$PORT/lfs:bench" --tls-verify=false; }
pull_skopeo_oci() { skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$PORT/lfs:bench" "oci:$WORK/pull/oci:bench"; }
pull_skopeo_cs() {
	skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$PORT/lfs:bench" \
		"containers-storage:[overlay@$WORK/pull/cs/root+$WORK/pull/cs/run]127.0.0.1:$PORT/lfs:bench"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$(date +%s)
for ((rep = 1; rep <= REPS; rep++)); do
	start_registry
	wipe "$WORK/pull"
	settle
	log "rep $rep: registry on 127.0.0.1:$PORT (pid $REG_PID)"
	# push into empty repositories (lfs, sko) of the new registry
	pushers=(layerfs skopeo)
	((rep % 2 == 0)) && pushers=(skopeo layerfs)
	for s in "${pushers[@]}"; do
		case $s in
		layerfs) measure "$rep" "push" layerfs push_layerfs lfs ;;
		skopeo) measure "$rep" "push" skopeo push_skopeo sko ;;
		esac
	done
	printf 'rep %s: store %s, layerfs pushed %s, skopeo pushed %s\n' "$rep" "$IMAGE_DIGEST" \
		"$(tr -d '\n' <"$WORK/digest-lfs" 2>/dev/null)" "$(tr -d '\n' <"$WORK/digest-sko" 2>/dev/null)" >>"$DIGESTS"
	# pull what layerfs pushed into empty destinations
	pullers=(layerfs skopeo-oci skopeo-cs)
	for ((i = 0; i < (rep - 1) % 3; i++)); do pullers=("${pullers[@]:1}" "${pullers[0]}"); done
	mkdir -p "$WORK/pull"
	for s in "${pullers[@]}"; do
		case $s in
		layerfs) measure "$rep" "pull" layerfs pull_layerfs ;;
		skopeo-oci) measure "$rep" "pull" skopeo-oci pull_skopeo_oci ;;
		skopeo-cs)
			((CS_OK)) || continue
			if ! measure "$rep" "pull" skopeo-cs pull_skopeo_cs; then
				CS_OK=0
				CS_WHY=$(grep -v '^\s*$' "$WORK/out.txt" | tail -1 | cut -c1-200)
				log "skopeo into containers-storage (overlay) does not work here: $CS_WHY"
			fi
			;;
		esac
	done
	# push again: the registry holds every blob (and the manifest) already
	for s in "${pushers[@]}"; do
		case $s in
		layerfs) measure "$rep" "push again" layerfs push_layerfs lfs ;;
		skopeo) measure "$rep" "push again" skopeo push_skopeo sko ;;
		esac
	done
	unmount_under "$WORK/pull"
done
T_END=$(date +%s)
stop_registry

# ------------------------------------------------------------------------------ report

REPORT=$WORK/report.md
{
	echo "# layerfs push/pull against skopeo copy, $(date '+%Y-%m-%d %H:%M %Z')"
	echo
	git_commit=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
	git -C "$REPO" diff --quiet HEAD 2>/dev/null || git_commit+=" (with uncommitted changes)"
	echo "- layerfs: $("$LAYERFS" --version 2>&1 | head -1), commit $git_commit; $(/usr/bin/skopeo --version); $(docker-registry --version 2>&1 | awk '{ print $1, $3 }') on 127.0.0.1, plain HTTP"
	echo "- image: $IMAGE_DESC; $UNPACKED MB unpacked"
	echo "- kernel $(uname -r); CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo) x $(nproc); work dir on $(findmnt -no FSTYPE,OPTIONS -T "$WORK" | cut -c1-60)"
	echo "- $REPS repetition(s), a new registry each, order rotating; page cache dropped before every command; load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg); $(((T_END - T_START) / 60)) min $(((T_END - T_START) % 60)) s"
	echo
	python3 - "$RAW" <<'PY'
import collections, statistics, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    if line.startswith('#'):
        continue
    rep, row, subj, sec, sync = line.rstrip('\n').split('\t')
    d = rows.setdefault(row, collections.OrderedDict()).setdefault(subj, {'t': [], 's': [], 'fail': 0})
    if sec == 'FAIL':
        d['fail'] += 1
    else:
        d['t'].append(float(sec))
        d['s'].append(float(sec) + float(sync))
def cell(v):
    if not v:
        return 'failed'
    m = statistics.median(v)
    return '%.2f s (%.2f-%.2f)' % (m, min(v), max(v)) if len(v) > 1 else '%.2f s' % m
def med(v):
    return statistics.median(v) if v else None
print('Medians (range over the repetitions); ratio = layerfs / skopeo (below 1: layerfs faster).')
print('"+sync": the command and a `sync` right after it (what it left unwritten).')
print()
print('| what | layerfs | skopeo | peer | ratio | ratio with +sync |')
print('|---|---|---|---|---|---|')
peers = {'push': ['skopeo'], 'push again': ['skopeo'], 'pull': ['skopeo-oci', 'skopeo-cs']}
names = {'skopeo': 'skopeo copy oci: -> docker://', 'skopeo-oci': 'skopeo copy -> oci: (no extraction)',
         'skopeo-cs': 'skopeo copy -> containers-storage: overlay (extracts)'}
for row, subj in rows.items():
    l = subj.get('layerfs', {'t': [], 's': []})
    for p in peers.get(row, []):
        if p not in subj:
            print('| %s | %s | not run | %s | | |' % (row, cell(l['t']), names[p]))
            continue
        s = subj[p]
        r = '%.2f' % (med(l['t']) / med(s['t'])) if l['t'] and s['t'] else ''
        rs = '%.2f' % (med(l['s']) / med(s['s'])) if l['s'] and s['s'] else ''
        print('| %s | %s<br>+sync %s | %s<br>+sync %s | %s | %s | %s |' % (
            row, cell(l['t']), cell(l['s']), cell(s['t']), cell(s['s']), names[p], r, rs))
PY
	echo
	if ((!CS_OK)); then
		echo "skopeo into containers-storage with the overlay driver did not work here: $CS_WHY"
		echo
	fi
	echo "Requests the registry logged (last repetition):"
	echo
	awk -F'\t' '{ last[$1 "\t" $2] = $3; if (!($1 "\t" $2 in seen)) { seen[$1 "\t" $2] = 1; order[++n] = $1 "\t" $2 } }
		END { for (i = 1; i <= n; i++) { split(order[i], k, "\t"); printf "- %s, %s: %s\n", k[1], k[2], last[order[i]] } }' "$REQS"
	echo
	echo "Manifest digests (stored, then as each pusher's registry answer):"
	echo
	sed 's/^/- /' "$DIGESTS"
} >"$REPORT"
cat "$REPORT"
if [[ -n $OUT ]]; then
	mkdir -p "$(dirname "$OUT")"
	cp "$REPORT" "$OUT.md"
	cp "$RAW" "$OUT.raw.tsv"
	log "report: $OUT.md, raw times: $OUT.raw.tsv"
fi
exit 0
