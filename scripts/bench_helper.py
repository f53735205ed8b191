#!/usr/bin/env python3
"""Helper for scripts/bench.sh (stdlib only).

Subcommands:
  gen      generate the seeded 3-layer lower stack, the 100-layer depth stack and the file lists
  tarlist  pick directories of a tree until about N bytes, for the untar tarball
  stat / readdir / randread / create / copyup / rename / unlink / keep / restore
           one timed operation; prints the elapsed seconds (of the operation only, not of
           the interpreter start) on stdout, exits 1 at the first error
  report   medians, ratios and peak RSS from the raw results TSV -> markdown + TSV

Everything generated depends only on the parameters and the seed (random.Random(seed)).
"""

import argparse
import bisect
import json
import os
import random
import stat as st
import statistics
import sys
import time

GEN_VERSION = "4"

WORDS = (
    "alpha beta gamma delta layer upper lower merge inode dentry cache page buffer "
    "request reply lookup getattr readdir open read write flush fsync release forget "
    "mount unmount daemon kernel fuse overlay whiteout opaque copy rename unlink create "
    "static const struct enum impl trait return if else for while match let mut fn pub "
    "int char void size_t uint64_t error result option some none self config value key "
    "index table entry node tree path name file dir link stat mode uid gid time hash"
).split()
NEEDLE = "layerfs_needle"


def die(msg):
    print(f"bench_helper: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# generation


def make_corpus(rng, nbytes):
    """Pseudo source text: lines of words, a rare needle for grep."""
    lines = []
    total = 0
    while total < nbytes:
        n = rng.randint(2, 12)
        indent = " " * (4 * rng.randint(0, 3))
        ws = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.002:
            ws[rng.randrange(n)] = NEEDLE
        line = indent + " ".join(ws) + ";\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


class Content:
    def __init__(self, rng, text_bytes, bin_bytes):
        t = make_corpus(rng, text_bytes)
        self.text = t + t
        self.tlen = len(t)
        b = rng.randbytes(bin_bytes)
        self.bin = b + b
        self.blen = len(b)

    def get(self, rng, size, binary):
        """`size` bytes (>= 1) starting with b'#', so copy-up can rewrite byte 0 unchanged."""
        size = max(1, size)
        if binary:
            off = rng.randrange(self.blen)
            data = self.bin[off : off + size]
        else:
            off = rng.randrange(self.tlen)
            data = self.text[off : off + size]
        return b"#" + data[1:]


def pick_size(rng, src):
    r = rng.random()
    if src:
        if r < 0.80:
            return int(min(4095, max(1, rng.lognormvariate(7.0, 0.9))))
        return rng.randint(10 * 1024, 100 * 1024)
    if r < 0.84:
        return int(min(4095, max(1, rng.lognormvariate(6.5, 1.1))))
    if r < 0.999:
        return int(10 * 1024 * (10 ** rng.random()))  # 10 KiB .. 100 KiB, log-uniform
    return rng.randint(1, 8) * 1024 * 1024 - rng.randint(0, 4095)  # a few MiB


SRC_EXT = [".c", ".h", ".rs", ".py", ".go", ".js", ".md", ".txt", ".toml", ".json"]
DATA_EXT = [".txt", ".json", ".xml", ".conf", ".log", ".csv", ".dat", ".png", ".so", ".gz"]
BIN_EXT = {".dat", ".png", ".so", ".gz"}


def write_file(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def whiteout(path):
    os.mknod(path, st.S_IFCHR | 0o000, os.makedev(0, 0))


def gen(a):
    rng = random.Random(a.seed)
    out = a.out
    if os.path.exists(os.path.join(out, ".complete")):
        die(f"{out} is already complete")
    layers = {k: os.path.join(out, "layers", k) for k in ("base", "mid", "top")}
    for d in layers.values():
        os.makedirs(d, exist_ok=True)
    content = Content(rng, 8 << 20, 8 << 20)

    # -- directories: (relpath, layer that introduces it, is_src)
    ndirs = a.dirs
    nsrc = max(2, ndirs // 10)
    dirs = [("tree", "base", False), ("tree/src", "base", True), ("tree/data", "base", False)]
    depth = {"tree": 0, "tree/src": 1, "tree/data": 1}
    children = {"tree": set(), "tree/src": set(), "tree/data": set()}
    while len(dirs) < ndirs:
        is_src = len(dirs) < nsrc
        pool = [d for d in dirs if d[2] == is_src and d[0] != "tree" and depth[d[0]] < 7]
        # prefer recent directories a bit: deeper, bushier trees
        parent = pool[min(len(pool) - 1, int(len(pool) * (rng.random() ** 0.7)))]
        layer = parent[1]
        if layer == "base" and rng.random() < 0.10:
            layer = "mid"
        name = rng.choice(WORDS) + (str(rng.randrange(1000)) if rng.random() < 0.6 else "")
        if name in children[parent[0]]:
            continue
        children[parent[0]].add(name)
        rel = parent[0] + "/" + name
        dirs.append((rel, layer, is_src))
        depth[rel] = depth[parent[0]] + 1
        children[rel] = set()
    dir_layer = {d[0]: d[1] for d in dirs}
    dir_src = {d[0]: d[2] for d in dirs}
    for rel, layer, _ in dirs:  # (parents of a mid directory are created in mid too)
        os.makedirs(os.path.join(layers[layer], rel), exist_ok=True)

    # -- files
    fdirs = [d[0] for d in dirs if d[0] not in ("tree", "tree/src", "tree/data")] or [
        "tree/src",
        "tree/data",
    ]
    # skewed but bounded: most directories hold a handful of files, the biggest a few hundred
    weights = [min(40.0, rng.lognormvariate(0.0, 1.2)) for _ in fdirs]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    nfiles = int(a.files * 1.04)  # the top layer deletes about 4%
    files = {}  # rel -> [layer, size, binary, kind]; kind: file|link
    while len(files) < nfiles:
        d = fdirs[bisect.bisect_left(cum, rng.random() * acc)]
        src = dir_src[d]
        ext = rng.choice(SRC_EXT if src else DATA_EXT)
        name = rng.choice(WORDS) + "_" + str(rng.randrange(100000)) + ext
        rel = d + "/" + name
        if rel in files or rel in dir_layer:
            continue
        if dir_layer[d] == "base":
            r = rng.random()
            layer = "base" if r < 0.80 else ("mid" if r < 0.97 else "top")
        else:
            layer = "mid" if rng.random() < 0.85 else "top"
        kind = "link" if (not src and rng.random() < 0.005) else "file"
        files[rel] = [layer, pick_size(rng, src), ext in BIN_EXT, kind]

    # -- top layer edits: whiteout 0.5% of the leaf base directories and make 0.5% opaque (only
    #    directories where the top layer adds nothing), then modify 5% and delete 3% of the
    #    remaining base files and delete 2% of the mid ones
    top_dirs = {r.rsplit("/", 1)[0] for r, v in files.items() if v[0] == "top"}
    leaf_base = sorted(
        d[0]
        for d in dirs
        if d[1] == "base" and not children[d[0]] and not d[2] and d[0].count("/") > 1 and d[0] not in top_dirs
    )
    rng.shuffle(leaf_base)
    nd = max(1, len(leaf_base) // 200)
    wh_dirs = set(leaf_base[:nd])
    opq_dirs = set(leaf_base[nd : 2 * nd])
    gone_dirs = wh_dirs | opq_dirs
    base_files = sorted(
        r for r, v in files.items() if v[0] == "base" and v[3] == "file" and r.rsplit("/", 1)[0] not in gone_dirs
    )
    rng.shuffle(base_files)
    nmod = len(base_files) * 5 // 100
    ndel = len(base_files) * 3 // 100
    modified = set(base_files[:nmod])
    deleted = set(base_files[nmod : nmod + ndel])
    mid_files = sorted(
        r for r, v in files.items() if v[0] == "mid" and v[3] == "file" and r.rsplit("/", 1)[0] not in gone_dirs
    )
    rng.shuffle(mid_files)
    deleted |= set(mid_files[: len(mid_files) * 2 // 100])

    def ensure_dir(layer, rel):
        os.makedirs(os.path.join(layers[layer], rel), exist_ok=True)

    links = []
    for rel in sorted(files):
        layer, size, binary, kind = files[rel]
        d = rel.rsplit("/", 1)[0]
        ensure_dir(layer, d)
        p = os.path.join(layers[layer], rel)
        if kind == "link":
            links.append(rel)
            continue
        mode = 0o755 if (rel.endswith(".py") and rng.random() < 0.2) else 0o644
        write_file(p, content.get(rng, size, binary), mode)
    for rel in links:  # relative symlinks to a sibling (may dangle: realistic enough)
        layer = files[rel][0]
        d = rel.rsplit("/", 1)[0]
        sib = sorted(children[d])[0] if children[d] else "missing_target"
        os.symlink(sib, os.path.join(layers[layer], rel))

    for rel in sorted(modified):
        ensure_dir("top", rel.rsplit("/", 1)[0])
        write_file(os.path.join(layers["top"], rel), content.get(rng, pick_size(rng, False), False))
    for rel in sorted(deleted):
        d = rel.rsplit("/", 1)[0]
        ensure_dir("top", d)
        p = os.path.join(layers["top"], rel)
        if os.path.lexists(p):
            os.unlink(p)
        whiteout(p)
    for d in sorted(wh_dirs):
        ensure_dir("top", d.rsplit("/", 1)[0])
        whiteout(os.path.join(layers["top"], d))
    for d in sorted(opq_dirs):
        ensure_dir("top", d)
        os.setxattr(os.path.join(layers["top"], d), "trusted.overlay.opaque", b"y")
        for i in range(2):
            write_file(os.path.join(layers["top"], d, f"opaque_new_{i}.txt"), content.get(rng, 500, False))

    # -- the merged view (what a correct union shows), for the lists
    def hidden(rel):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            pre = "/".join(parts[:i])
            if pre in wh_dirs:
                return True
            if pre in opq_dirs and files.get(rel, ["top"])[0] != "top":
                return True
        return False

    merged = sorted(r for r in files if r not in deleted and not hidden(r))
    merged_regular = [r for r in merged if files[r][3] == "file"]

    # -- wide directory: 10,000 names merged from two layers (10% overlap)
    nw = a.wide
    ensure_dir("base", "wide")
    ensure_dir("mid", "wide")
    for i in range(0, nw * 6 // 10):
        write_file(os.path.join(layers["base"], "wide", f"w{i:06d}"), content.get(rng, rng.randint(1, 200), False))
    for i in range(nw * 5 // 10, nw):
        write_file(os.path.join(layers["mid"], "wide", f"w{i:06d}"), content.get(rng, rng.randint(1, 200), False))

    # -- the big file: a seeded 1 MiB block, varied per MiB, first byte '#'
    ensure_dir("base", "big")
    block = bytearray(rng.randbytes(1 << 20))
    fd = os.open(os.path.join(layers["base"], "big", "blob.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = a.big
        i = 0
        while left > 0:
            block[0:8] = i.to_bytes(8, "little")
            if i == 0:
                block[0] = ord("#")
            n = min(left, len(block))
            os.write(fd, memoryview(block)[:n])
            left -= n
            i += 1
    finally:
        os.close(fd)

    # -- lists (paths relative to the mount root)
    lists = os.path.join(out, "lists")
    os.makedirs(lists, exist_ok=True)
    lr = random.Random(a.seed + 1)
    sample = lr.sample(merged, min(a.nstat, len(merged)))
    untouched = [
        r
        for r in merged_regular
        if files[r][0] == "base" and r not in modified and files[r][1] < 4096 and not dir_src[r.rsplit("/", 1)[0]]
    ]
    lr.shuffle(untouched)
    n = a.nmod
    if len(untouched) < 3 * n:
        die(f"only {len(untouched)} untouched small base files, need {3 * n}")

    def wlist(name, items):
        with open(os.path.join(lists, name), "w") as f:
            for it in items:
                f.write(it + "\n")

    wlist("stat", sample)
    wlist("copyup", sorted(untouched[:n]))
    wlist("rename", sorted(untouched[n : 2 * n]))
    wlist("unlink", sorted(untouched[2 * n : 3 * n]))

    # -- depth stack: 100 layers; the files live in the bottom one (99), every layer has every
    #    directory (so a lookup has to look in each) and two files of its own
    dd = os.path.join(out, "depth")
    nlay = 100
    ndf = a.depth_files
    ndd = max(1, ndf // 20)
    ddirs = [f"p{i // 25:03d}/q{i:04d}" for i in range(ndd)]
    for layer in range(nlay):
        for d in ddirs:
            os.makedirs(os.path.join(dd, f"{layer:02d}", d), exist_ok=True)
        for j in range(2):
            write_file(os.path.join(dd, f"{layer:02d}", ddirs[(layer * 7 + j) % ndd], f"own_{layer}_{j}"), b"#x\n")
    dfiles = []
    for i in range(ndf):
        rel = f"{ddirs[i % ndd]}/f{i:06d}.txt"
        write_file(os.path.join(dd, "99", rel), content.get(rng, pick_size(rng, True) % 4096, False))
        dfiles.append(rel)
    wlist("depth", dfiles)

    info = {
        "merged_files": len(merged),
        "dirs": ndirs,
        "wide": nw,
        "big": a.big,
        "modified": len(modified),
        "deleted_files": len(deleted),
        "whiteout_dirs": len(wh_dirs),
        "opaque_dirs": len(opq_dirs),
        "bytes": sum(files[r][1] for r in merged_regular),
    }
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


def tarlist(a):
    """Directories of ROOT/SUB in walk order, whole, until about BYTES; paths relative to ROOT."""
    total = 0
    out = []
    for dp, dns, fns in os.walk(os.path.join(a.root, a.sub)):
        dns.sort()
        fns.sort()
        rel = os.path.relpath(dp, a.root)
        out.append(rel)
        for fn in fns:
            p = os.path.join(dp, fn)
            s = os.lstat(p)
            total += s.st_size
            out.append(os.path.join(rel, fn))
        if total >= a.bytes:
            break
    sys.stdout.write("".join(x + "\n" for x in out))
    print(f"tarlist: {len(out)} entries, {total} bytes", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# timed operations


def read_list(path, root):
    with open(path) as f:
        return [os.path.join(root, line.rstrip("\n")) for line in f if line.strip()]


def report_time(t0, extra=""):
    dt = time.perf_counter() - t0
    print(f"{dt:.6f}{(' ' + extra) if extra else ''}")


def op_stat(a):
    paths = read_list(a.list, a.root)
    t0 = time.perf_counter()
    for p in paths:
        os.lstat(p)
    report_time(t0, f"n={len(paths)}")


def op_readdir(a):
    t0 = time.perf_counter()
    n = 0
    with os.scandir(a.dir) as it:
        for _ in it:
            n += 1
    report_time(t0, f"n={n}")


def op_randread(a):
    rng = random.Random(a.seed)
    fd = os.open(a.file, os.O_RDONLY)
    try:
        blocks = os.fstat(fd).st_size // 4096
        offs = [rng.randrange(blocks) * 4096 for _ in range(a.count)]
        t0 = time.perf_counter()
        for off in offs:
            if len(os.pread(fd, 4096, off)) != 4096:
                die(f"short read at {off}")
        report_time(t0, f"n={a.count}")
    finally:
        os.close(fd)


def op_create(a):
    rng = random.Random(a.seed)
    per = 100
    sizes = [rng.randint(100, 4096) for _ in range(a.count)]
    buf = (b"#" + bytes(range(32, 127)) * 64)[:4096]
    t0 = time.perf_counter()
    os.mkdir(a.dir)
    for i in range(a.count):
        if i % per == 0:
            d = os.path.join(a.dir, f"d{i // per:04d}")
            os.mkdir(d)
        fd = os.open(os.path.join(d, f"f{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, buf[: sizes[i]])
        finally:
            os.close(fd)
    report_time(t0, f"n={a.count}")


def op_copyup(a):
    """open O_RDWR and write 1 byte (b'#' at offset 0: every generated file starts with it)."""
    paths = read_list(a.list, a.root) if a.list else [a.file]
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDWR)
        try:
            if os.pwrite(fd, b"#", 0) != 1:
                die(f"short write {p}")
        finally:
            os.close(fd)
    report_time(t0, f"n={len(paths)}")


def op_rename(a):
    paths = read_list(a.list, a.root)
    if a.back:  # undo (native only, untimed)
        for p in paths:
            if os.path.lexists(p + ".renamed") and not os.path.lexists(p):
                os.rename(p + ".renamed", p)
        return
    t0 = time.perf_counter()
    for p in paths:
        os.rename(p, p + ".renamed")
    report_time(t0, f"n={len(paths)}")


def op_unlink(a):
    paths = read_list(a.list, a.root)
    t0 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    report_time(t0, f"n={len(paths)}")


def op_keep(a):
    """Hard-link the listed files into KEEPDIR (native unlink: no data is freed, nothing lost)."""
    paths = read_list(a.list, a.root)
    os.makedirs(a.keepdir, exist_ok=True)
    for i, p in enumerate(paths):
        k = os.path.join(a.keepdir, str(i))
        if not os.path.lexists(k):
            os.link(p, k)


def op_restore(a):
    paths = read_list(a.list, a.root)
    for i, p in enumerate(paths):
        if not os.path.lexists(p):
            os.link(os.path.join(a.keepdir, str(i)), p)


# ---------------------------------------------------------------------------------------------
# report


def fmt_t(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 0.1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def report(a):
    rows = []
    with open(a.raw) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            parts += [""] * (8 - len(parts))
            rows.append(parts[:8])
    subjects = a.subjects.split(",")
    order = []
    cells = {}  # (row, subj) -> {"t": [...], "fail": n, "rss": [...], "notes": set()}
    others = []
    for wl, row, subj, rep, val, rss, note, other in rows:
        if row not in order:
            order.append(row)
        c = cells.setdefault(
            (row, subj), {"t": [], "fail": 0, "rss": [], "notes": set(), "reasons": [], "other": []}
        )
        if other:
            c["other"].append(int(other))
            others.append(int(other))
        if val == "FAIL" or val == "":
            c["fail"] += 1
            if note:
                c["reasons"].append(note)
        else:
            c["t"].append(float(val))
            if note:
                c["notes"].add(note)
        if rss:
            c["rss"].append(int(rss))

    def med(row, subj):
        c = cells.get((row, subj))
        if not c or not c["t"]:
            return None
        return statistics.median(c["t"])

    def cell_txt(row, subj):
        c = cells.get((row, subj))
        if c is None:
            return "-"
        if not c["t"]:
            return "FAIL"
        s = fmt_t(statistics.median(c["t"]))
        if c["fail"]:
            s += f" ({c['fail']} FAIL)"
        return s

    def ratio(x, y):
        if x is None or y is None or y <= 0:
            return "-"
        return f"{x / y:.2f}"

    def rss_txt(row, subj):
        c = cells.get((row, subj))
        if not c or not c["rss"]:
            return "-"
        return f"{max(c['rss']) / 1024:.1f}"

    out = []
    out.append(a.header.rstrip("\n") if a.header else "")
    out.append("")
    out.append(
        "Median wall time in seconds over the repetitions (FAIL: every repetition failed; "
        "'(k FAIL)': k of them failed, median of the rest). Ratios are of medians. "
        "RSS: the daemon's VmHWM in MiB at the end of the workload (fresh mount per cell; max over repetitions)."
    )
    if others:
        srt = sorted(others)
        busy = sum(1 for o in others if o > 25)
        out.append("")
        out.append(
            f"CPU used by anything but this benchmark during the timed workloads (other tenants, "
            f"kernel threads): median {statistics.median(srt):.0f}%, max {srt[-1]}% of the machine; "
            f"{busy} of {len(others)} measurements above 25% (their times are less trustworthy)."
        )
    out.append("")
    head = ["workload"] + subjects
    have = set(subjects)
    if {"layerfs", "kernel"} <= have:
        head.append("layerfs/kernel")
    if {"layerfs", "fuse-overlayfs"} <= have:
        head.append("fuse-ovl/layerfs")
    if "layerfs" in have:
        head.append("layerfs RSS MiB")
    if "fuse-overlayfs" in have:
        head.append("fuse-ovl RSS MiB")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    tsv = ["row\tsubject\tmedian_s\tmin_s\tmax_s\tn_ok\tn_fail\tpeak_rss_kib\tnote"]
    for row in order:
        line = [row] + [cell_txt(row, s) for s in subjects]
        if {"layerfs", "kernel"} <= have:
            line.append(ratio(med(row, "layerfs"), med(row, "kernel")))
        if {"layerfs", "fuse-overlayfs"} <= have:
            line.append(ratio(med(row, "fuse-overlayfs"), med(row, "layerfs")))
        if "layerfs" in have:
            line.append(rss_txt(row, "layerfs"))
        if "fuse-overlayfs" in have:
            line.append(rss_txt(row, "fuse-overlayfs"))
        out.append("| " + " | ".join(line) + " |")
        for s in subjects:
            c = cells.get((row, s))
            if not c:
                continue
            ts = c["t"]
            tsv.append(
                "\t".join(
                    [
                        row,
                        s,
                        f"{statistics.median(ts):.6f}" if ts else "FAIL",
                        f"{min(ts):.6f}" if ts else "",
                        f"{max(ts):.6f}" if ts else "",
                        str(len(ts)),
                        str(c["fail"]),
                        str(max(c["rss"])) if c["rss"] else "",
                        ";".join(sorted(c["notes"]) + sorted(set(c["reasons"]))),
                    ]
                )
            )

    # depth scaling
    drows = [r for r in order if r.startswith("depth")]
    if drows:
        out.append("")
        out.append("Lookup/stat with many lower layers: time with 20 and 100 layers relative to 2 layers.")
        out.append("")
        out.append("| subject | " + " | ".join(f"{m} {k}/2" for m in ("cold", "warm") for k in (20, 100)) + " |")
        out.append("|---|" + "---|" * 4)
        def drow(k, m):
            return next((r for r in drows if r.startswith(f"depth{k} ") and r.endswith(" " + m)), None)

        for s in subjects:
            vals = []
            for m in ("cold", "warm"):
                base = med(drow(2, m), s)
                for k in (20, 100):
                    vals.append(ratio(med(drow(k, m), s), base))
            if any(v != "-" for v in vals):
                out.append(f"| {s} | " + " | ".join(vals) + " |")

    # noisy cells and disagreements in what the subjects saw
    warn = []
    for row in order:
        for s in subjects:
            c = cells.get((row, s))
            if c and len(c["t"]) >= 2:
                m = statistics.median(c["t"])
                if m > 0 and (max(c["t"]) - min(c["t"])) / m > 0.5:
                    oc = f", other CPU up to {max(c['other'])}%" if c["other"] else ""
                    warn.append(
                        f"- noisy: {row} / {s}: min {fmt_t(min(c['t']))} max {fmt_t(max(c['t']))} median {fmt_t(m)}{oc}"
                    )
        ref = cells.get((row, "kernel"))
        if ref and ref["notes"]:
            for s in subjects:
                c = cells.get((row, s))
                if s in ("kernel", "native") or not c or not c["notes"]:
                    continue
                if c["notes"] != ref["notes"]:
                    warn.append(
                        f"- differs from kernel: {row} / {s}: {','.join(sorted(c['notes']))} vs {','.join(sorted(ref['notes']))}"
                    )
        for s in subjects:
            c = cells.get((row, s))
            if c and c["fail"]:
                why = sorted(set(c["reasons"]))[0] if c["reasons"] else "no message"
                warn.append(f"- FAIL {row} / {s} ({c['fail']} of {c['fail'] + len(c['t'])}): {why}")
    if a.extra and os.path.exists(a.extra):
        with open(a.extra) as f:
            extra = f.read().strip()
        if extra:
            out.append("")
            out.append(extra)
    if warn:
        out.append("")
        out.append("Notes:")
        out.extend(warn)
    text = "\n".join(out) + "\n"
    with open(a.md, "w") as f:
        f.write(text)
    with open(a.tsv, "w") as f:
        f.write("\n".join(tsv) + "\n")
    sys.stdout.write(text)


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    g = sp.add_parser("gen")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, required=True)
    g.add_argument("--files", type=int, required=True)
    g.add_argument("--dirs", type=int, required=True)
    g.add_argument("--big", type=int, required=True)
    g.add_argument("--wide", type=int, required=True)
    g.add_argument("--nstat", type=int, required=True)
    g.add_argument("--nmod", type=int, required=True)
    g.add_argument("--depth-files", type=int, required=True)
    sp.add_parser("version")
    t = sp.add_parser("tarlist")
    t.add_argument("root")
    t.add_argument("sub")
    t.add_argument("bytes", type=int)
    s = sp.add_parser("stat")
    s.add_argument("list")
    s.add_argument("root")
    s = sp.add_parser("readdir")
    s.add_argument("dir")
    s = sp.add_parser("randread")
    s.add_argument("file")
    s.add_argument("count", type=int)
    s.add_argument("--seed", type=int, default=7)
    s = sp.add_parser("create")
    s.add_argument("dir")
    s.add_argument("count", type=int)
    s.add_argument("--seed", type=int, default=11)
    s = sp.add_parser("copyup")
    s.add_argument("--list")
    s.add_argument("--file")
    s.add_argument("root", nargs="?", default="/")
    s = sp.add_parser("rename")
    s.add_argument("list")
    s.add_argument("root")
    s.add_argument("--back", action="store_true")
    s = sp.add_parser("unlink")
    s.add_argument("list")
    s.add_argument("root")
    for name in ("keep", "restore"):
        s = sp.add_parser(name)
        s.add_argument("list")
        s.add_argument("root")
        s.add_argument("keepdir")
    r = sp.add_parser("report")
    r.add_argument("raw")
    r.add_argument("--subjects", required=True)
    r.add_argument("--md", required=True)
    r.add_argument("--tsv", required=True)
    r.add_argument("--header", default="")
    r.add_argument("--extra", default="")
    a = p.parse_args()
    if a.cmd == "version":
        print(GEN_VERSION)
        return
    {
        "gen": gen,
        "tarlist": tarlist,
        "stat": op_stat,
        "readdir": op_readdir,
        "randread": op_randread,
        "create": op_create,
        "copyup": op_copyup,
        "rename": op_rename,
        "unlink": op_unlink,
        "keep": op_keep,
        "restore": op_restore,
        "report": report,
    }[a.cmd](a)


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        die(f"{e.strerror or e} ({e.filename or ''})")
