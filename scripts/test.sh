#!/usr/bin/env bash
# The test command: installs what the tests need, then runs fmt, clippy and every test,
# including the integration tests that mount real FUSE filesystems (they need root and
# /dev/fuse; with CI=true they fail instead of skipping when those are missing).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v setfattr >/dev/null 2>&1 || need+=(attr)
# tests/idmap.rs makes kernel idmapped mounts (its oracle) through a small python3 helper.
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v fuse-overlayfs >/dev/null 2>&1 || need+=(fuse-overlayfs)
# Store interop tests read and write OCI layouts with the reference tools.
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v podman >/dev/null 2>&1 || need+=(podman)
# Registry tests run the distribution server, with a private CA and an htpasswd file.
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# Build and run tests run steps through runc in containers made from busybox-static.
command -v runc >/dev/null 2>&1 || need+=(runc)
case "$(ldd "$(command -v busybox 2>/dev/null || echo /nonexistent)" 2>&1)" in
  *"not a dynamic"*) ;;
  *) need+=(busybox-static) ;;
esac
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

# FUSE-over-io_uring is served only when the fuse module offers it: turn it on for the run
# (the tests cover both transports) and put the setting back afterwards.
uring_param=/sys/module/fuse/parameters/enable_uring
uring_saved=""
if [ "$(id -u)" = 0 ] && [ -w "$uring_param" ]; then
  uring_saved=$(cat "$uring_param")
  echo Y >"$uring_param"
  trap 'echo "$uring_saved" >"$uring_param"' EXIT
elif [ -e "$uring_param" ]; then
  echo "note: $uring_param is $(cat "$uring_param"); FUSE-over-io_uring is tested only when it is Y"
else
  echo "note: this kernel has no FUSE-over-io_uring; only /dev/fuse is tested"
fi

# Only this crate: the vendored fuser keeps its upstream formatting.
cargo fmt -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"

# The FUSE behaviour tests again over /dev/fuse, when the first run went over io_uring; this
# run also serves every open of a regular file by passthrough (the first run reads small lower
# files through the page cache, the default cache_small_files), so both ways of serving opens
# are exercised on their own; tests that mix them on one inode set the option themselves.
if [ -n "$uring_saved" ]; then
  echo "== FUSE tests again with io_uring=off,cache_small_files=0 (requests over /dev/fuse)"
  LAYERFS_TEST_MOUNT_OPTS=io_uring=off,cache_small_files=0 cargo test \
    --test read_union --test write_path --test concurrency --test crash --test mount_cli --test io_uring --test idmap --test metacopy \
    -- --test-threads="${TEST_THREADS:-4}"
fi
