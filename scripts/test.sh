#!/usr/bin/env bash
# The test command: installs what the tests need, then runs fmt, clippy and every test,
# including the integration tests that mount real FUSE filesystems (they need root and
# /dev/fuse; with CI=true they fail instead of skipping when those are missing).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v setfattr >/dev/null 2>&1 || need+=(attr)
command -v fuse-overlayfs >/dev/null 2>&1 || need+=(fuse-overlayfs)
# Store interop tests read and write OCI layouts with the reference tools.
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v podman >/dev/null 2>&1 || need+=(podman)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
fi
if [ "$(id -u)" = 0 ]; then
  modprobe fuse 2>/dev/null || true
  modprobe overlay 2>/dev/null || true
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"
