#!/usr/bin/env python3
"""idmapped_mount.py SRC DST DISK:SHOWN:LEN[:DISK:SHOWN:LEN...]

Bind-mounts SRC at DST as a kernel idmapped mount: ids DISK.. on disk are shown as SHOWN..,
the meaning layerfs gives `uidmapping=` (the test oracle for tests/idmap.rs). util-linux 2.38's
X-mount.idmap silently makes a plain bind mount, and Rust tests may not hold unsafe code, so
the new mount API is called here: open_tree(OPEN_TREE_CLONE), mount_setattr(MOUNT_ATTR_IDMAP)
with a user namespace holding the map, move_mount. Needs root.
"""
import ctypes
import os
import subprocess
import sys
import time

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64 and aarch64 alike
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def main():
    src, dst, spec = sys.argv[1:4]
    nums = [int(n) for n in spec.split(":") if n]
    if not nums or len(nums) % 3:
        sys.exit(f"bad mapping {spec!r}")
    # In /proc/PID/uid_map an id inside the namespace comes first: for an idmapped mount the
    # ids inside are the ids on disk, the ids outside the ones shown.
    lines = "".join(f"{nums[i]} {nums[i + 1]} {nums[i + 2]}\n" for i in range(0, len(nums), 3))
    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        ns = f"/proc/{holder.pid}/ns/user"
        for _ in range(200):
            if os.readlink(ns) != os.readlink("/proc/self/ns/user"):
                break
            time.sleep(0.01)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(lines)
        nsfd = os.open(ns, os.O_RDONLY)
        libc = ctypes.CDLL(None, use_errno=True)
        tree = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
        if tree < 0:
            sys.exit(f"open_tree {src}: {os.strerror(ctypes.get_errno())}")
        attr = MountAttr(MOUNT_ATTR_IDMAP, 0, 0, nsfd)
        if libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)):
            sys.exit(f"mount_setattr {src}: {os.strerror(ctypes.get_errno())}")
        if libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH):
            sys.exit(f"move_mount {dst}: {os.strerror(ctypes.get_errno())}")
    finally:
        holder.kill()
        holder.wait()


if __name__ == "__main__":
    main()
