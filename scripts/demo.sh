#!/usr/bin/env bash
# The main job, end to end, on the default store (/var/lib/layerfs as root, or $LAYERFS_ROOT):
# make a busybox base image locally (no network), build an app image from a Containerfile,
# run it, change one source line, rebuild (every step above the change is CACHED, and the
# first miss says why), run it again, show the history with layer sizes, then mount the image
# and commit a container's changes, the layer tool underneath.
#
#   bash scripts/demo.sh
#
# Needs root (FUSE mounts, the OCI runtime). Installs fuse3, runc and busybox-static when
# missing. The images it makes (demo/base, demo/app, demo/app-patched) stay in the store; its
# containers are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it mounts and runs containers)" >&2; exit 1; }
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v runc >/dev/null 2>&1 || need+=(runc)
case "$(ldd /bin/busybox 2>&1)" in *"not a dynamic"*) ;; *) need+=(busybox-static) ;; esac
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
  if mountpoint -q "$work/mnt" 2>/dev/null; then "$lfs" umount "$work/mnt" || umount -l "$work/mnt"; fi
  "$lfs" rm --container "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A base image from busybox, made here: demo/base"
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,root,home/app}
cp /bin/busybox "$rootfs/bin/"
for app in sh ls cat echo rm mkdir mv ln wc sort sed id sleep head; do ln -s busybox "$rootfs/bin/$app"; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
"$lfs" diff "$rootfs" -o "$work/base.tar" >/dev/null
"$lfs" import "$work/base.tar" --name demo/base >/dev/null
"$lfs" images

step "2. A project: a dependency manifest, sources, and a Containerfile"
app=$work/app
mkdir -p "$app/src" "$app/node_modules"
echo '{"name": "seeds", "dependencies": {"left-pad": "1.3.0"}}' >"$app/package.json"
echo 'console.log("hello from seeds v1")' >"$app/src/server.js"
echo 'module.exports = (s) => s.trim()' >"$app/src/util.js"
echo 'local junk that must not reach the image' >"$app/node_modules/junk.js"
printf 'node_modules\n*.log\n' >"$app/.dockerignore"
cat >"$app/Containerfile" <<'EOF'
FROM demo/base
ARG VERSION=1.0
ENV APP_HOME=/app
WORKDIR $APP_HOME
COPY package.json ./
RUN echo "installing the dependencies of $(cat package.json)" && mkdir -p deps && sleep 1 && echo left-pad >deps/list
COPY src/ ./src/
RUN sed 's/^/built: /' src/server.js >bundle.txt && echo "$VERSION" >version.txt
USER app
CMD ["sh", "-c", "cat /app/bundle.txt; echo version $(cat /app/version.txt), deps: $(cat /app/deps/list), uid $(id -u)"]
EOF
cat "$app/Containerfile"

step "3. First build: every step runs"
time "$lfs" build -t demo/app "$app"

step "4. Run it"
"$lfs" run --rm demo/app

step "5. Change one source line and rebuild: the dependency install stays CACHED"
echo 'console.log("hello from seeds v2")' >"$app/src/server.js"
time "$lfs" build -t demo/app "$app"
"$lfs" run --rm demo/app

step "6. Rebuild with nothing changed: every step CACHED, nothing mounted"
time "$lfs" build -t demo/app "$app"

step "7. The image's history, with layer sizes"
"$lfs" history demo/app

step "8. The layer tool underneath: mount the image as a container, change it, commit"
mkdir -p "$work/mnt"
"$lfs" mount --image demo/app --container "$container" "$work/mnt"
echo "patched in a container" >"$work/mnt/app/PATCHED"
"$lfs" umount "$work/mnt"
"$lfs" commit --container "$container" --from demo/app --name demo/app-patched -m "demo: a patch" >/dev/null
"$lfs" run --rm demo/app-patched cat /app/PATCHED
"$lfs" cache ls | head -n 5
echo "done: try '$lfs build -t demo/app $app' after editing $app, or '$lfs run --rm demo/app'"
