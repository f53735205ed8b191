#!/usr/bin/env python3
"""Helper of scripts/bench_build.sh: the generated project, image listings and their
comparison, and the report. Standard library only.

  gen --ctx DIR [sizes]         write the "seeds-like" project (deterministic for a seed)
  listing ROOT                  one sorted line per entry under ROOT: what an image holds
  layermap ARCHIVE              which layer of a docker-archive holds each path
  compare NAME=LIST...          the entries that differ, the known ones explained
  parse BUILDER LOG             steps cached (and for layerfs: mounted, and why steps ran)
  report RAW --subjects S,...   medians, ratios to layerfs, cache behaviour: markdown and TSV
"""

import argparse
import hashlib
import os
import random
import re
import stat
import statistics
import sys

GEN_VERSION = "1"


def die(msg):
    sys.stderr.write(f"bench_build_helper: {msg}\n")
    sys.exit(1)


# ------------------------------------------------------------------------------ the project

DOCKERFILE = """\
# A "seeds-like" Node.js project, without Node: the install and build steps are busybox
# stand-ins of the same shape (see scripts/bench_build.sh).
FROM localhost/bbase
WORKDIR /app
COPY package.json ./
# "npm ci": {dep_files} files of a few KB under node_modules/, made from the manifest's content,
# after a {sleep} s sleep that stands in for the network time of fetching the packages.
RUN sleep {sleep} && m=$(cat package.json) && b="$m$m$m" && i=0 && \\
    while [ $i -lt {dep_files} ]; do \\
      d=node_modules/dep-$((i % {dep_dirs})); [ -d $d ] || mkdir -p $d; \\
      printf '%s\\n// file %d\\n' "$b" $i >$d/f$i.js; i=$((i + 1)); \\
    done
COPY . .
# "npm run build": read every source file, write a bundle and two small reports into dist/.
RUN mkdir -p dist && find src -type f -name '*.js' | sort | xargs cat >dist/bundle.js && \\
    wc -l dist/bundle.js >dist/stats.txt && \\
    sed -n 's/^export function \\([a-z0-9_]*\\).*/\\1/p' dist/bundle.js | wc -l >dist/symbols.txt
ENV NODE_ENV=production PORT=8080
EXPOSE 8080
USER app
CMD ["sh", "-c", "cat dist/stats.txt dist/symbols.txt"]
"""

DOCKERIGNORE = """\
# never sent to the builder: the local dependency tree, test fixtures, logs
node_modules/
fixtures/
*.log
"""


def manifest(deps, extra=""):
    lines = ['{', '  "name": "seeds",', '  "version": "1.0.0",', '  "private": true,',
             '  "scripts": { "build": "bundle src", "start": "node dist/bundle.js" },',
             '  "dependencies": {']
    names = [f'    "dep-{i:03d}": "^{1 + i % 7}.{i % 13}.{i % 5}"' for i in range(deps)]
    if extra:
        names.append(f'    "{extra}": "^1.0.0"')
    lines.append(",\n".join(names))
    lines += ['  }', '}']
    return "\n".join(lines) + "\n"


def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def gen(a):
    rng = random.Random(a.seed)
    ctx = a.ctx
    os.makedirs(ctx, exist_ok=True)
    write(os.path.join(ctx, "Dockerfile"),
          DOCKERFILE.format(dep_files=a.dep_files, dep_dirs=a.dep_dirs, sleep=a.sleep).encode())
    write(os.path.join(ctx, ".dockerignore"), DOCKERIGNORE.encode())
    write(os.path.join(ctx, "package.json"), manifest(a.deps).encode())
    write(os.path.join(ctx, "README.md"), b"# seeds\n\nA generated project for bench_build.sh.\n")
    # src/: a few hundred module directories, files of 1-6 KB of plausible code
    total = 0
    for i in range(a.src_files):
        d = os.path.join(ctx, "src", f"mod-{i % a.src_dirs:03d}")
        if i < a.src_dirs:
            os.makedirs(d, exist_ok=True)
        n = rng.randint(12, 80)
        body = [f"// src/mod-{i % a.src_dirs:03d}/file-{i:05d}.js\n",
                f'import {{ helper }} from "../mod-{rng.randrange(a.src_dirs):03d}/index.js";\n']
        for j in range(n):
            body.append(f"export function f_{i}_{j}(x) {{ return helper(x, {rng.randrange(1 << 20)}); }}\n")
        data = "".join(body).encode()
        total += len(data)
        write(os.path.join(d, f"file-{i:05d}.js"), data)
    # fixtures/ (ignored): a few large incompressible files
    fx = os.path.join(ctx, "fixtures")
    os.makedirs(fx, exist_ok=True)
    left, k = a.fixtures_mib << 20, 0
    while left > 0:
        n = min(left, 16 << 20)
        write(os.path.join(fx, f"blob-{k:02d}.bin"), rng.randbytes(n))
        left -= n
        k += 1
    # node_modules/ (ignored): a stale local install, many small files
    for i in range(a.local_modules):
        d = os.path.join(ctx, "node_modules", f"local-{i % 50:02d}")
        if i < 50:
            os.makedirs(d, exist_ok=True)
        write(os.path.join(d, f"m{i}.js"), f"module.exports = {i};\n".encode())
    print(f"src_bytes={total}")


# ------------------------------------------------------------------------------ listings

def listing(a):
    """path, type, mode, owner, size, sha256 or link target: not times, not directory sizes
    (which depend on the filesystem the tree is read from)."""
    root = a.root.rstrip("/") or "/"
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(p, root)
            st = os.lstat(p)
            m = st.st_mode
            owner = f"{st.st_uid}:{st.st_gid}"
            perm = f"{stat.S_IMODE(m):04o}"
            if stat.S_ISREG(m):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out.append(f"{rel}\tfile\t{perm}\t{owner}\t{st.st_size}\t{h.hexdigest()[:16]}")
            elif stat.S_ISDIR(m):
                out.append(f"{rel}\tdir\t{perm}\t{owner}\t-\t-")
            elif stat.S_ISLNK(m):
                out.append(f"{rel}\tsymlink\t{perm}\t{owner}\t-\t{os.readlink(p)}")
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                kind = "char" if stat.S_ISCHR(m) else "block"
                out.append(f"{rel}\t{kind}\t{perm}\t{owner}\t-\t{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
            else:
                kind = "fifo" if stat.S_ISFIFO(m) else "socket" if stat.S_ISSOCK(m) else "other"
                out.append(f"{rel}\t{kind}\t{perm}\t{owner}\t-\t-")
    out.sort()
    sys.stdout.write("".join(line + "\n" for line in out))


# Entries a builder's export is known to hold besides what the Containerfile made, and why.
# "init": not in any of the image's layers, added when the container for the export was made;
# "layer": in the image, in the layer of a step. Which of the two it is comes from the image's
# own layers (layermap), never from this table.
KNOWN = {
    ("buildkit", "init"): {
        "/.dockerenv": "the marker file of every docker container",
        "/etc/hostname": "the mount target of the container's hostname file",
        "/etc/hosts": "the mount target of the container's /etc/hosts",
        "/etc/resolv.conf": "the mount target of the container's /etc/resolv.conf",
        "/etc/mtab": "the /etc/mtab -> /proc/mounts link docker adds",
        "/dev": "the mount target of the container's /dev",
        "/dev/console": "the mount target of the container's console",
        "/dev/pts": "the mount target of the container's /dev/pts",
        "/dev/shm": "the mount target of the container's /dev/shm",
        "/proc": "the mount target of the container's /proc",
        "/sys": "the mount target of the container's /sys",
    },
    ("buildkit", "layer"): {
        "/dev": "the mount target BuildKit makes for the RUN container's /dev",
        "/proc": "the mount target BuildKit makes for the RUN container's /proc",
        "/sys": "the mount target BuildKit makes for the RUN container's /sys",
    },
    ("buildah", "layer"): {
        "/etc/hostname": "the mount target buildah makes for the RUN container's hostname file",
        "/etc/hosts": "the mount target buildah makes for the RUN container's /etc/hosts",
        "/etc/resolv.conf": "the mount target buildah makes for the RUN container's /etc/resolv.conf",
        "/run": "a mount point buildah creates in the RUN container's root for its runtime files (/run/.containerenv)",
        "/run/.containerenv": "the mount target of the RUN container's .containerenv",
        "/dev": "the mount target buildah makes for the RUN container's /dev",
        "/proc": "the mount target buildah makes for the RUN container's /proc",
        "/sys": "the mount target buildah makes for the RUN container's /sys",
    },
}


def layermap(a):
    """path, layer number and the history entry of the layer that last holds it, for a
    docker-archive (docker save, buildah push docker-archive:)."""
    import json
    import tarfile

    with tarfile.open(a.archive) as t:
        man = json.load(t.extractfile("manifest.json"))[0]
        cfg = json.load(t.extractfile(man["Config"]))
        made_by = [h.get("created_by", "") for h in cfg.get("history", []) if not h.get("empty_layer")]
        owner = {}
        for i, name in enumerate(man["Layers"]):
            with tarfile.open(fileobj=t.extractfile(name)) as lt:
                for m in lt:
                    rel = "/" + m.name.lstrip("./").rstrip("/")
                    if rel != "/":
                        owner[rel] = (i + 1, made_by[i] if i < len(made_by) else "")
    for p in sorted(owner):
        n, by = owner[p]
        by = " ".join(by.split())
        print(f"{p}\t{n}\t{by[:60]}")


def compare(a):
    names, tables = [], []
    for spec in a.lists:
        name, _, path = spec.partition("=")
        names.append(name)
        t = {}
        with open(path) as f:
            for line in f:
                p, _, rest = line.rstrip("\n").partition("\t")
                t[p] = rest
        tables.append(t)
    origins = {}  # name -> {path: "layer N (created by)"}
    for spec in a.origins:
        name, _, path = spec.partition("=")
        m = origins.setdefault(name, {})
        with open(path) as f:
            for line in f:
                p, n, by = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                m[p] = f"layer {n}" + (f" ({by})" if by else "")
    paths = sorted(set().union(*tables))
    counts = ", ".join(f"{n} {len(t)}" for n, t in zip(names, tables))
    diffs = []
    for p in paths:
        vals = [t.get(p) for t in tables]
        if len(set(vals)) > 1:
            diffs.append((p, vals))
    print(f"entries: {counts}")
    if not diffs:
        print("images identical: yes (paths, types, modes, owners, file sizes and contents, link targets)")
        return
    unexplained = 0
    lines = []
    for p, vals in diffs:
        # explained: an entry some builders lack, where every builder that has it is known to
        # add it where its image (or the container made to export it) shows it comes from
        why, ok = [], None in vals
        for n, v in zip(names, vals):
            if v is None:
                continue
            if n in origins:
                where = origins[n].get(p)
                kind = "layer" if where else "init"
                where = where or "not in the image's layers: added when the container for the export was made"
            else:
                kind, where = "layer", "in the image"
            known = KNOWN.get((n, kind), {}).get(p)
            if known is None:
                ok = False
                why.append(f"{n}: {where}")
            else:
                why.append(f"{n}: {where}: {known}")
        if not ok:
            unexplained += 1
        shown = "; ".join(f"{n}: {v.replace(chr(9), ' ') if v is not None else 'absent'}" for n, v in zip(names, vals))
        lines.append(f"- `{p}`: {shown}\n  - {'explained' if ok else 'NOT EXPLAINED'}: {'; '.join(why)}")
    verdict = "no"
    if unexplained == 0:
        verdict += f" (all {len(diffs)} differences are entries the builders are known to add, explained below)"
    else:
        verdict += f" ({unexplained} of {len(diffs)} differences not explained)"
    print(f"images identical: {verdict}")
    print("\n".join(lines[: a.max]))
    if len(lines) > a.max:
        print(f"... and {len(lines) - a.max} more")
    if unexplained:
        sys.exit(3)


# ------------------------------------------------------------------------------ build logs

STEP_RE = re.compile(r"^\[(\S+) (\d+)/(\d+)\] (.*)$")
RUNNING_RE = re.compile(r"^\[(\S+) (\d+)\] running: (.*)$")
SUMMARY_RE = re.compile(r"\((\d+) of (\d+) steps cached\)")


def span(nums):
    return str(nums[0]) if len(nums) == 1 else f"{nums[0]}-{nums[-1]}"


def parse(a):
    """cached, total, mounted (layerfs) and a note (layerfs: why each step ran; BuildKit: which
    steps it took from its cache), separated by US (0x1f: not white space, so that the shell's
    read keeps empty fields), from a build's output."""
    try:
        with open(a.log, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        print("\x1f\x1f\x1f")
        return
    cached = total = mounted = ""
    note = ""
    if a.builder == "layerfs":
        instr, ran = {}, []
        for line in lines:
            m = STEP_RE.match(line)
            if m:
                instr[int(m.group(2))] = m.group(4)
            m = RUNNING_RE.match(line)
            if m:
                ran.append((int(m.group(2)), m.group(3)))
            m = SUMMARY_RE.search(line)
            if m and line.startswith("built "):
                cached, total = m.group(1), m.group(2)
        # a step that made a layer ran in a layerfs mount of its own (config-only steps do not)
        mounted = str(sum(1 for line in lines if re.search(r"\] done in .*, layer ", line)))
        groups = []  # consecutive steps with the same reason
        for n, why in ran:
            if groups and groups[-1][1] == why and groups[-1][0][-1] == n - 1:
                groups[-1][0].append(n)
            else:
                groups.append(([n], why))
        parts = []
        for nums, why in groups:
            what = instr.get(nums[0], "")
            what = (what[:28] + "...") if len(what) > 31 else what
            label = f"step {nums[0]} ({what})" if len(nums) == 1 else f"steps {span(nums)}"
            parts.append(f"{label}: {why}")
        note = "; ".join(parts)
    elif a.builder == "buildah":
        steps = [int(m.group(2)) for m in (re.match(r"^STEP (\d+)/(\d+): ", x) for x in lines) if m]
        if steps:
            total = str(max(steps) - 1)
            cached = str(sum(1 for x in lines if x.startswith("--> Using cache")))
    elif a.builder == "buildkit":
        vertex, name, n_all, hit = {}, {}, 0, set()
        for x in lines:
            m = re.match(r"^#(\d+) \[(?:[^\]]* )?(\d+)/(\d+)\] (.*)$", x)
            if m:
                vertex[m.group(1)] = int(m.group(2))
                name[m.group(1)] = m.group(4)
                n_all = max(n_all, int(m.group(3)))
            m = re.match(r"^#(\d+) CACHED$", x)
            if m:
                hit.add(m.group(1))
        if n_all:
            total = str(n_all - 1)
            steps = sorted((vertex[v], name[v]) for v in hit if vertex.get(v, 1) > 1)
            cached = str(len(steps))
            note = "cached: " + "; ".join(f"step {n} ({w[:28]})" for n, w in steps) if steps else ""
    print("\x1f".join([cached, total, mounted, " ".join(note.split())]))


# ------------------------------------------------------------------------------ report

def fmt_t(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def report(a):
    subjects = a.subjects.split(",")
    order, cells, other_cpu = [], {}, []
    with open(a.raw) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t") + [""] * 9
            scen, subj, rep, val, cached, total, mounted, other, reasons = parts[:9]
            if scen not in order:
                order.append(scen)
            c = cells.setdefault(
                (scen, subj), {"t": [], "fail": [], "cached": [], "reasons": [], "mounted": [], "other": []}
            )
            if other:
                c["other"].append(int(other))
                other_cpu.append(int(other))
            if val in ("", "FAIL"):
                c["fail"].append(reasons or "no message")
                continue
            c["t"].append(float(val))
            if cached != "":
                c["cached"].append(f"{cached}/{total}")
            if mounted != "":
                c["mounted"].append(mounted)
            if reasons:
                c["reasons"].append(reasons)

    def med(scen, subj):
        c = cells.get((scen, subj))
        return statistics.median(c["t"]) if c and c["t"] else None

    def cell_txt(scen, subj):
        c = cells.get((scen, subj))
        if c is None:
            return "-"
        if not c["t"]:
            return "FAIL"
        s = fmt_t(statistics.median(c["t"]))
        if c["fail"]:
            s += f" ({len(c['fail'])} FAIL)"
        return s

    def ratio(x, y):
        return "-" if x is None or y is None or y <= 0 else f"{x / y:.2f}"

    others = [s for s in subjects if s != "layerfs"]
    out = [a.header.rstrip("\n"), ""]
    out.append("Median wall time of the build command in seconds over the repetitions (FAIL: every "
               "repetition failed; '(k FAIL)': k of them did, median of the rest). Ratios are of "
               "medians: above 1, layerfs was faster.")
    if other_cpu:
        srt = sorted(other_cpu)
        busy = sum(1 for o in other_cpu if o > 25)
        out.append("")
        out.append(
            f"CPU used by anything but this benchmark during the timed builds (other tenants, "
            f"kernel threads): median {statistics.median(srt):.0f}%, max {srt[-1]}% of the machine; "
            f"{busy} of {len(other_cpu)} builds above 25% (their times are less trustworthy)."
        )
    out.append("")
    head = ["scenario"] + subjects
    if "layerfs" in subjects:
        head += [f"{s}/layerfs" for s in others]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    tsv = ["scenario\tsubject\tmedian_s\tmin_s\tmax_s\tn_ok\tn_fail\tsteps_cached\tmax_other_cpu_pct"]
    for scen in order:
        row = [scen] + [cell_txt(scen, s) for s in subjects]
        if "layerfs" in subjects:
            row += [ratio(med(scen, s), med(scen, "layerfs")) for s in others]
        out.append("| " + " | ".join(row) + " |")
        for s in subjects:
            c = cells.get((scen, s))
            if not c:
                continue
            ts = c["t"]
            tsv.append("\t".join([scen, s, f"{statistics.median(ts):.6f}" if ts else "FAIL",
                                  f"{min(ts):.6f}" if ts else "", f"{max(ts):.6f}" if ts else "",
                                  str(len(ts)), str(len(c["fail"])), ",".join(sorted(set(c["cached"]))),
                                  str(max(c["other"])) if c["other"] else ""]))
    # steps cached, per builder (what each builder's own output says)
    out.append("")
    out.append("Steps each builder reported as cached (of the steps after FROM), per repetition when they differ:")
    out.append("")
    out.append("| scenario | " + " | ".join(subjects) + " |")
    out.append("|---|" + "---|" * len(subjects))
    for scen in order:
        vals = []
        for s in subjects:
            c = cells.get((scen, s))
            vals.append(",".join(sorted(set(c["cached"]))) if c and c["cached"] else "-")
        out.append(f"| {scen} | " + " | ".join(vals) + " |")
    for scen in order:
        for s in others:
            c = cells.get((scen, s))
            if c and "--no-cache" in scen and c["reasons"]:
                out.append("")
                hits = sorted(set(r.removeprefix("cached: ") for r in c["reasons"]))
                out.append(f"{s} under --no-cache printed CACHED for: {', '.join(hits)}.")
    if "layerfs" in subjects:
        out.append("")
        out.append("layerfs: the reason it printed for each step it ran (`[stage-0 N] running: REASON`), "
                   "and how many steps mounted (made a layer, `done in ..., layer`: RUN, COPY and WORKDIR "
                   "run in a layerfs mount of their own; a cached step and a config-only step such as "
                   "ENV mount nothing):")
        out.append("")
        for scen in order:
            c = cells.get((scen, "layerfs"))
            if not c:
                continue
            rs = sorted(set(c["reasons"]))
            mnt = ",".join(sorted(set(c["mounted"]))) or "-"
            if not rs:
                out.append(f"- {scen}: every step cached; steps that mounted: {mnt}")
            else:
                out.append(f"- {scen}: steps that mounted: {mnt}")
            for r in rs:
                n = c["reasons"].count(r)
                part = "" if len(rs) == 1 else f" ({n} of {len(c['reasons'])} reps)"
                out.append(f"  - {part.strip() + ': ' if part else ''}{r}")
    warn = []
    for scen in order:
        for s in subjects:
            c = cells.get((scen, s))
            if not c:
                continue
            if len(c["t"]) >= 2:
                m = statistics.median(c["t"])
                if m > 0 and (max(c["t"]) - min(c["t"])) / m > 0.5:
                    oc = f", other CPU up to {max(c['other'])}%" if c["other"] else ""
                    warn.append(
                        f"- noisy: {scen} / {s}: min {fmt_t(min(c['t']))} max {fmt_t(max(c['t']))} median {fmt_t(m)}{oc}"
                    )
            if c["fail"]:
                warn.append(f"- FAIL {scen} / {s} ({len(c['fail'])} of {len(c['fail']) + len(c['t'])}): {c['fail'][0]}")
    if a.extra and os.path.exists(a.extra):
        with open(a.extra) as f:
            extra = f.read().strip()
        if extra:
            out += ["", extra]
    if warn:
        out += ["", "Notes:"] + warn
    text = "\n".join(out) + "\n"
    with open(a.md, "w") as f:
        f.write(text)
    with open(a.tsv, "w") as f:
        f.write("\n".join(tsv) + "\n")
    sys.stdout.write(text)


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    sp.add_parser("version")
    g = sp.add_parser("gen")
    g.add_argument("--ctx", required=True)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--deps", type=int, default=40, help="dependencies in package.json")
    g.add_argument("--dep-files", type=int, default=3000, help="files the install step writes")
    g.add_argument("--dep-dirs", type=int, default=100)
    g.add_argument("--sleep", type=int, default=2, help="the install step's stand-in network time")
    g.add_argument("--src-files", type=int, default=10000)
    g.add_argument("--src-dirs", type=int, default=300)
    g.add_argument("--fixtures-mib", type=int, default=200)
    g.add_argument("--local-modules", type=int, default=2000)
    m = sp.add_parser("manifest")
    m.add_argument("--deps", type=int, default=40)
    m.add_argument("--extra", default="")
    pa = sp.add_parser("parse")
    pa.add_argument("builder", choices=["layerfs", "buildah", "buildkit"])
    pa.add_argument("log")
    ls = sp.add_parser("listing")
    ls.add_argument("root")
    c = sp.add_parser("compare")
    c.add_argument("lists", nargs="+", help="NAME=FILE")
    c.add_argument("--max", type=int, default=60)
    c.add_argument("--origin", dest="origins", action="append", default=[], help="NAME=LAYERMAP")
    lm = sp.add_parser("layermap")
    lm.add_argument("archive")
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
    elif a.cmd == "manifest":
        sys.stdout.write(manifest(a.deps, a.extra))
    else:
        {"gen": gen, "listing": listing, "compare": compare, "layermap": layermap, "parse": parse, "report": report}[a.cmd](a)


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        die(f"{e.strerror or e} ({e.filename or ''})")
