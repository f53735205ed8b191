#!/usr/bin/env bash
# Diff and commit speed against `tar -C UPPER -cf - . | sha256sum` on an upper of 10,000
# files holding ~1 GiB of random data (the issue's workload), with peak memory.
# Usage: scripts/bench_store.sh [WORKDIR]   (default /var/tmp/layerfs-store-bench; needs root
# for commit's ownership-preserving extraction). Prints one line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/layerfs-store-bench}
cargo build --release --quiet
bin=$PWD/target/release/layerfs
mkdir -p "$work"
cd "$work"
if [ ! -f upper.done ]; then
  rm -rf upper && mkdir upper
  python3 - <<'PY'
import os, random
random.seed(1)
for d in range(100):
    dd = os.path.join('upper', 'd%03d' % d, 'sub')
    os.makedirs(dd)
    for f in range(100):
        with open(os.path.join(dd, 'f%03d' % f), 'wb') as fh:
            fh.write(os.urandom(random.randint(1, 2 * 107374)))
PY
  touch upper.done
fi
echo "upper: $(find upper -type f | wc -l) files, $(du -sh upper | cut -f1); load: $(cut -d' ' -f1-3 /proc/loadavg)"
cat upper/*/*/* >/dev/null   # warm the page cache for every contender
t() { /usr/bin/time -f "$1: %e s, peak RSS %M KiB" "${@:2}" >/dev/null; }
for round in 1 2; do
  t "tar | sha256sum" sh -c 'tar -C upper -cf - . | sha256sum'
  t "layerfs diff (digest only)" "$bin" diff upper
  t "layerfs diff -o - | sha256sum" sh -c "'$bin' diff upper -o - 2>/dev/null | sha256sum"
done
rm -rf store
for c in gzip zstd none; do
  t "layerfs commit --compression $c" "$bin" --root "$PWD/store" commit upper --from scratch --name "bench-$c" --compression "$c"
done
rm -rf store
