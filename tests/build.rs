//! `layerfs build` and `layerfs run` end to end: real builds of real Containerfiles from a
//! busybox base made here (no network), RUN steps through runc in layerfs mounts, the cache
//! and what it says about each step, multi-stage builds, failures that leave nothing behind,
//! hostile inputs.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{can_mount, mkdirp, wfile};

/// A store with a busybox base image, and a build context.
struct Bench {
    dir: tempfile::TempDir,
}

fn ready() -> bool {
    if !can_mount() {
        return false;
    }
    for tool in ["runc", "busybox"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{tool} is missing and CI=true (scripts/test.sh installs it)");
            }
            eprintln!("skipping: {tool} is not installed");
            return false;
        }
    }
    true
}

impl Bench {
    fn new() -> Bench {
        let b = Bench {
            dir: tempfile::tempdir().unwrap(),
        };
        let tar = common::busybox_base_tar(b.dir.path());
        // A fixed creation time: two benches hold the same base image, as two machines that
        // pulled it.
        let out = b.layerfs(&[
            "import",
            tar.to_str().unwrap(),
            "--name",
            "base",
            "--source-date-epoch",
            "1700000000",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        mkdirp(b.ctx());
        b
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn ctx(&self) -> PathBuf {
        self.p("ctx")
    }

    fn store(&self) -> PathBuf {
        self.p("store")
    }

    fn layerfs(&self, args: &[&str]) -> Output {
        Command::new(common::bin())
            .arg("--root")
            .arg(self.store())
            .args(args)
            .output()
            .expect("run layerfs")
    }

    fn containerfile(&self, text: &str) {
        wfile(self.ctx().join("Containerfile"), text);
    }

    /// Build the context with extra arguments; returns (exit code, stdout, stderr).
    fn build(&self, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec!["build", "-t", "app"];
        args.extend_from_slice(extra);
        let ctx = self.ctx();
        args.push(ctx.to_str().unwrap());
        let out = self.layerfs(&args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn build_ok(&self, extra: &[&str]) -> String {
        let (code, _, err) = self.build(extra);
        assert_eq!(code, 0, "build failed:\n{err}");
        err
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let mut a = vec!["run", "--rm"];
        a.extend_from_slice(args);
        let out = self.layerfs(&a);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Nothing of a build is left: no mounts under the store, no staging, fsck clean.
    fn assert_clean(&self) {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let store = fs::canonicalize(self.store()).unwrap();
        assert!(
            !mounts.contains(store.to_str().unwrap()),
            "mounts left under the store:\n{mounts}"
        );
        let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "staging left: {tmp:?}");
        let out = self.layerfs(&["fsck", "--store"]);
        assert!(
            out.status.success(),
            "fsck --store: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Lines of `err` that report a step's outcome, as `(step number, outcome)`.
fn outcomes(err: &str) -> Vec<(usize, String)> {
    err.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (head, tail) = rest.split_once("] ")?;
            if head.contains('/') {
                return None;
            }
            let n: usize = head.rsplit(' ').next()?.parse().ok()?;
            let tail = tail.to_string();
            (tail == "CACHED" || tail.starts_with("running: ")).then_some((n, tail))
        })
        .collect()
}

fn app_project(b: &Bench) {
    wfile(b.ctx().join("package.json"), "{\"deps\": 1}\n");
    wfile(b.ctx().join("src/server.js"), "console.log('v1')\n");
    wfile(b.ctx().join("src/lib/util.js"), "module.exports = 1\n");
    wfile(b.ctx().join("node_modules/big.bin"), "ignored\n");
    wfile(b.ctx().join(".dockerignore"), "node_modules\n*.log\n");
    wfile(b.ctx().join("debug.log"), "ignored too\n");
    b.containerfile(
        "FROM base\n\
         ARG VERSION=1\n\
         ENV APP_HOME=/app\n\
         WORKDIR $APP_HOME\n\
         COPY package.json ./\n\
         RUN echo \"installed deps of $(cat package.json)\" > deps.txt\n\
         COPY src/ ./src/\n\
         RUN ls -R src > manifest.txt && echo built-$VERSION > version.txt\n\
         USER app\n\
         CMD [\"sh\", \"-c\", \"cat /app/version.txt /app/deps.txt; id -u; ls /app/src\"]\n",
    );
}

#[test]
fn cold_build_cached_rebuild_and_an_edit_that_reruns_only_what_follows() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    app_project(&b);
    let err = b.build_ok(&[]);
    let first = outcomes(&err);
    // FROM and ARG have nothing to run; every other step runs on a cold cache.
    assert!(
        first
            .iter()
            .filter(|(n, _)| *n > 2)
            .all(|(_, o)| o.starts_with("running: not in the cache")),
        "{err}"
    );
    let (code, out) = b.run(&["app"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "built-1\ninstalled deps of {\"deps\": 1}\n1000\nlib\nserver.js\n"
    );

    // Nothing changed: every step is cached, and nothing is mounted to know it.
    let t = Instant::now();
    let err = b.build_ok(&[]);
    let took = t.elapsed();
    let again = outcomes(&err);
    assert!(again.iter().all(|(_, o)| o == "CACHED"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // An ignored file changes nothing.
    wfile(b.ctx().join("node_modules/big.bin"), "changed\n");
    wfile(b.ctx().join("debug.log"), "changed\n");
    let err = b.build_ok(&[]);
    assert!(outcomes(&err).iter().all(|(_, o)| o == "CACHED"), "{err}");

    // Only a touch: the content is the same, so is the key.
    let now = std::time::SystemTime::now();
    fs::File::options()
        .write(true)
        .open(b.ctx().join("src/server.js"))
        .unwrap()
        .set_modified(now)
        .unwrap();
    let err = b.build_ok(&[]);
    assert!(outcomes(&err).iter().all(|(_, o)| o == "CACHED"), "{err}");

    // One source line: the COPY of src/ says why, the RUN after it says after which step,
    // and what came before stays cached.
    wfile(b.ctx().join("src/server.js"), "console.log('v2')\n");
    let err = b.build_ok(&[]);
    let o = outcomes(&err);
    let by_step = |n: usize| {
        o.iter()
            .find(|(s, _)| *s == n)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    };
    for n in 1..=6 {
        assert_eq!(by_step(n), "CACHED", "step {n}:\n{err}");
    }
    assert_eq!(by_step(7), "running: src/server.js modified", "{err}");
    assert!(by_step(8).starts_with("running: after step 7"), "{err}");

    // A new file under src/ is counted.
    wfile(b.ctx().join("src/a.js"), "a\n");
    wfile(b.ctx().join("src/b.js"), "b\n");
    let err = b.build_ok(&[]);
    assert!(err.contains("running: 2 files added under src/"), "{err}");

    // A build arg: the RUN that sees it runs, the reason names it.
    let err = b.build_ok(&["--build-arg", "VERSION=2"]);
    assert!(err.contains("running: build arg VERSION changed"), "{err}");
    let (_, out) = b.run(&["app"]);
    assert!(out.starts_with("built-2\n"), "{out}");

    // --no-cache runs everything and says so.
    let err = b.build_ok(&["--no-cache", "--build-arg", "VERSION=2"]);
    let o = outcomes(&err);
    assert!(
        o.iter()
            .filter(|(n, _)| *n > 2)
            .all(|(_, t)| t == "running: --no-cache"),
        "{err}"
    );

    let hist = b.layerfs(&["history", "app"]);
    let hist = String::from_utf8_lossy(&hist.stdout);
    assert!(
        hist.contains("RUN |1 VERSION=2 /bin/sh -c ls -R src"),
        "{hist}"
    );
    assert!(hist.contains("COPY src/ ./src/"), "{hist}");
    b.assert_clean();
}

#[test]
fn a_rebuilt_step_with_the_same_result_keeps_later_steps_cached() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    wfile(b.ctx().join("f"), "f\n");
    let cf = |run: &str| format!("FROM base\n{run}\nCOPY f /f\nRUN cat /same.txt /f > /both\n");
    b.containerfile(&cf("RUN echo same > /same.txt"));
    b.build_ok(&["--source-date-epoch", "1700000000"]);
    // The same command written differently: the step runs again, makes the same layer, and
    // the steps after it stay cached (early cut-off).
    b.containerfile(&cf("RUN echo  same  >  /same.txt"));
    let err = b.build_ok(&["--source-date-epoch", "1700000000"]);
    let o = outcomes(&err);
    assert_eq!(
        o.iter().find(|(n, _)| *n == 2).map(|(_, t)| t.as_str()),
        Some("running: instruction changed"),
        "{err}"
    );
    assert!(
        o.iter().filter(|(n, _)| *n > 2).all(|(_, t)| t == "CACHED"),
        "the RUN made the same layer, so what follows stays cached:\n{err}"
    );
}

#[test]
fn multi_stage_with_target_and_copy_from() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    wfile(b.ctx().join("main.c"), "int main(){}\n");
    b.containerfile(
        "FROM base AS builder\n\
         COPY main.c /src/\n\
         RUN mkdir -p /out && sed 's/main/built/' /src/main.c > /out/app.bin\n\
         FROM base AS unused\n\
         RUN false\n\
         FROM base\n\
         COPY --from=builder /out/app.bin /usr/local/bin/app.bin\n\
         CMD [\"cat\", \"/usr/local/bin/app.bin\"]\n",
    );
    let err = b.build_ok(&[]);
    assert!(
        !err.contains("[unused"),
        "a stage the target does not need was built:\n{err}"
    );
    let (code, out) = b.run(&["app"]);
    assert_eq!((code, out.as_str()), (0, "int built(){}\n"));
    // --target builds only the stage asked for (and what it needs).
    let err = b.build_ok(&["--target", "builder"]);
    assert!(!err.contains("[stage-2"), "{err}");
    let (_, out) = b.run(&["app", "ls", "/out"]);
    assert_eq!(out, "app.bin\n");
    // Changing the source reruns the builder and then the COPY --from.
    wfile(b.ctx().join("main.c"), "int main(){return 1;}\n");
    let err = b.build_ok(&[]);
    assert!(err.contains("running: main.c modified"), "{err}");
    assert!(
        err.contains("running: the stage or image it copies from changed"),
        "{err}"
    );
    b.assert_clean();
}

#[test]
fn a_failing_step_says_what_failed_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    b.containerfile("FROM base\nRUN echo one && echo two >&2 && exit 7\nRUN echo never\n");
    let entries_before = fs::read_dir(b.store().join("cache/entries"))
        .unwrap()
        .count();
    let (code, _, err) = b.build(&[]);
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("Containerfile:2"), "{last}");
    assert!(last.contains("exit code 7"), "{last}");
    assert!(last.contains("two"), "the last output lines: {last}");
    assert_eq!(
        fs::read_dir(b.store().join("cache/entries"))
            .unwrap()
            .count(),
        entries_before,
        "a failed step left a cache entry"
    );
    b.assert_clean();
}

#[test]
fn a_run_step_sees_its_image_and_nothing_of_the_host() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    b.containerfile(
        "FROM base\n\
         RUN test ! -e /work && test ! -e /var/lib/layerfs && ls /sys/class/net > /net.txt && \
         (echo x > /etc/hosts 2>/dev/null && echo hosts-writable || echo hosts-read-only) > /hosts.txt\n",
    );
    b.build_ok(&[]);
    let (_, out) = b.run(&["app", "cat", "/net.txt", "/hosts.txt"]);
    assert_eq!(out, "lo\nhosts-read-only\n");
    // /etc/hosts and the runtime's mount points never reach the layer: the image, mounted.
    let mnt = b.p("mnt");
    mkdirp(&mnt);
    let out = b.layerfs(&["mount", "--image", "app", mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut etc: Vec<String> = fs::read_dir(mnt.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    etc.sort();
    let top: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    common::unmount_retrying(&mnt);
    assert_eq!(etc, ["group", "passwd"]);
    for stub in ["proc", "dev", "sys"] {
        assert!(
            !top.contains(&stub.to_string()),
            "{stub} in the image: {top:?}"
        );
    }
}

#[test]
fn copy_never_reads_outside_the_context() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    wfile(b.p("secret"), "secret\n");
    symlink("../secret", b.ctx().join("escape")).unwrap();
    symlink("/etc", b.ctx().join("etc-link")).unwrap();
    for (cf, needle) in [
        (
            "FROM base\nCOPY ../secret /s\n",
            "outside the build context",
        ),
        (
            "FROM base\nCOPY etc-link/passwd /s\n",
            "outside the build context",
        ),
        ("FROM base\nCOPY missing /s\n", "not found"),
    ] {
        b.containerfile(cf);
        let (code, _, err) = b.build(&[]);
        assert_ne!(code, 0, "{cf}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(needle), "{cf}: {last}");
    }
    // A source that is a symlink out of the context is copied as the symlink: nothing outside
    // is read.
    b.containerfile("FROM base\nCOPY escape /s\n");
    b.build_ok(&[]);
    let (_, out) = b.run(&[
        "app",
        "sh",
        "-c",
        "ls -l /s | sed 's/.* -> //'; cat /s 2>/dev/null || echo unreadable",
    ]);
    assert_eq!(out, "../secret\nunreadable\n");
    // A symlink inside the context is copied as a symlink.
    wfile(b.ctx().join("dir/real"), "r\n");
    symlink("real", b.ctx().join("dir/link")).unwrap();
    b.containerfile("FROM base\nCOPY dir /d/\n");
    b.build_ok(&[]);
    let (_, out) = b.run(&[
        "app",
        "sh",
        "-c",
        "ls -l /d/link | sed 's/.* -> //'; cat /d/link",
    ]);
    assert_eq!(out, "real\nr\n");
    b.assert_clean();
}

#[test]
fn source_date_epoch_gives_the_same_digest_in_two_fresh_stores() {
    if !ready() {
        return;
    }
    let digest = |b: &Bench| {
        wfile(b.ctx().join("f"), "content\n");
        b.containerfile(
            "FROM base\nCOPY f /f\nRUN mkdir /made && echo x > /made/x\nENV A=1\nCMD [\"cat\",\"/f\"]\n",
        );
        let (code, out, err) = b.build(&["--source-date-epoch", "1700000000"]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    };
    let one = digest(&Bench::new());
    let two = digest(&Bench::new());
    assert!(one.starts_with("sha256:"), "{one}");
    assert_eq!(one, two);
}

#[test]
fn containerfile_errors_name_the_line_and_exit_2() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let huge = format!("FROM base\nRUN echo {}\n", "x".repeat(2 << 20));
    let stages: String = (0..20_000)
        .map(|i| format!("FROM base AS s{i}\n"))
        .collect();
    for (cf, needle) in [
        ("FROM base\nCOPY onlyone\n", "Containerfile: line 2"),
        ("FROM base\nBOGUS x\n", "line 2"),
        ("RUN echo before from\n", "line 1"),
        ("FROM base\nENV A=\"unterminated\n", "line 2"),
        (huge.as_str(), "Containerfile"),
        (stages.as_str(), "Containerfile"),
    ] {
        b.containerfile(cf);
        let t = Instant::now();
        let (code, _, err) = b.build(&[]);
        assert_eq!(code, 2, "{}: {err}", &cf[..cf.len().min(40)]);
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("layerfs: ") && last.contains(needle),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(20));
    }
}

#[test]
fn layerfs_run_passes_the_exit_status_and_keeps_a_named_container() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    b.containerfile("FROM base\nENV GREETING=hi\nWORKDIR /w\nCMD [\"sh\",\"-c\",\"echo $GREETING from $(pwd)\"]\n");
    b.build_ok(&[]);
    let (code, out) = b.run(&["app"]);
    assert_eq!((code, out.as_str()), (0, "hi from /w\n"));
    let (code, out) = b.run(&[
        "-e",
        "GREETING=yo",
        "-w",
        "/tmp",
        "-u",
        "app",
        "app",
        "sh",
        "-c",
        "echo $GREETING $(pwd) $(id -u); exit 4",
    ]);
    assert_eq!((code, out.as_str()), (4, "yo /tmp 1000\n"));
    // --name keeps the upper as a store container, which commit turns into an image.
    let out = b.layerfs(&[
        "run",
        "--name",
        "c1",
        "app",
        "sh",
        "-c",
        "echo kept > /kept",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.layerfs(&[
        "commit",
        "--container",
        "c1",
        "--from",
        "app",
        "--name",
        "app2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, out) = b.run(&["app2", "cat", "/kept"]);
    assert_eq!(out, "kept\n");
    b.assert_clean();
}

#[test]
fn add_extracts_local_archives_and_workdir_is_created() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let tree = b.p("tree");
    wfile(tree.join("pkg/a.txt"), "from the archive\n");
    symlink("a.txt", tree.join("pkg/link")).unwrap();
    let st = Command::new("tar")
        .args(["--owner=1234", "--group=2345", "-C"])
        .arg(&tree)
        .arg("-czf")
        .arg(b.ctx().join("pkg.tar.gz"))
        .arg("pkg")
        .status()
        .unwrap();
    assert!(st.success());
    wfile(b.ctx().join("plain.txt"), "plain\n");
    b.containerfile(
        "FROM base\n\
         USER app\n\
         WORKDIR /srv/data\n\
         USER root\n\
         ADD pkg.tar.gz /opt/\n\
         ADD --chown=app:app plain.txt ./\n",
    );
    b.build_ok(&[]);
    let (_, out) = b.run(&[
        "app",
        "sh",
        "-c",
        "cat /opt/pkg/a.txt; ls -l /opt/pkg/link | sed 's/.* -> //'; stat -c '%u:%g' /opt/pkg/a.txt /srv/data /srv/data/plain.txt; pwd",
    ]);
    assert_eq!(
        out,
        "from the archive\na.txt\n1234:2345\n1000:1000\n1000:1000\n/srv/data\n"
    );
    // An archive with a path out of it is refused, and the build leaves nothing.
    let evil = b.ctx().join("evil.tar");
    {
        let mut t = tar::Builder::new(fs::File::create(&evil).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let name = b"../escape";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        t.append(&h, &b"x"[..]).unwrap();
        t.finish().unwrap();
    }
    b.containerfile("FROM base\nADD evil.tar /\n");
    let (code, _, err) = b.build(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ADD evil.tar"), "{err}");
    b.assert_clean();
}

#[test]
fn json_progress_cache_ls_prune_and_gc() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    b.containerfile("FROM base\nRUN echo hello > /h\nENV A=1\n");
    let (code, out, _) = b.build(&["--progress", "json"]);
    assert_eq!(code, 0);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let ends: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "end").collect();
    let run_end = ends
        .iter()
        .find(|e| e["step"] == 2)
        .expect("an end event for the RUN");
    assert_eq!(run_end["cached"], false);
    assert!(run_end["key"].as_str().unwrap().starts_with("sha256:"));
    assert!(run_end["layer_size"].as_u64().unwrap() > 0);
    assert!(
        run_end["reason"]
            .as_str()
            .unwrap()
            .contains("not in the cache")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "output" && e["line"] == "hello" || e["event"] == "done")
    );
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");

    let ls = b.layerfs(&["cache", "ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("RUN /bin/sh -c echo hello > /h"), "{ls}");
    // The image goes, the cache keeps its layer through gc; prune --all lets gc free it.
    let layer_of_run = run_end["key"].as_str().unwrap().to_string();
    assert!(b.layerfs(&["rm", "app"]).status.success());
    assert!(b.layerfs(&["gc"]).status.success());
    let layers = |b: &Bench| fs::read_dir(b.store().join("layers")).unwrap().count();
    let kept = layers(&b);
    let err = b.build_ok(&[]);
    assert!(outcomes(&err).iter().all(|(_, o)| o == "CACHED"), "{err}");
    assert!(b.layerfs(&["rm", "app"]).status.success());
    let out = b.layerfs(&["cache", "prune", "--all"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 2 cache entries"));
    assert!(b.layerfs(&["gc"]).status.success());
    assert_eq!(
        layers(&b),
        kept - 1,
        "the RUN's layer ({layer_of_run}) was freed"
    );
    b.assert_clean();
}

/// The image config of `name` in the store, read from its OCI layout.
fn image_config(b: &Bench, name: &str) -> serde_json::Value {
    let store = b.store();
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .expect("named in index.json");
    let manifest = read(desc["digest"].as_str().unwrap());
    read(manifest["config"]["digest"].as_str().unwrap())
}

#[test]
fn every_config_instruction_reaches_the_image_config_and_history() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let host = if cfg!(target_arch = "x86_64") {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    b.containerfile(&format!(
        "FROM --platform={host} base\n\
         LABEL org.example.a=1 \"b c\"=\"d e\"\n\
         MAINTAINER someone@example.org\n\
         ENV A=1 B=\"two words\"\n\
         ENV C=$A-$B\n\
         EXPOSE 80 443/udp\n\
         VOLUME /data\n\
         VOLUME [\"/cache\"]\n\
         STOPSIGNAL SIGTERM\n\
         HEALTHCHECK --interval=30s --retries=2 CMD test -e /\n\
         ONBUILD RUN echo child\n\
         SHELL [\"/bin/sh\", \"-ec\"]\n\
         USER app:app\n\
         WORKDIR /w\n\
         ENTRYPOINT [\"sh\", \"-c\"]\n\
         CMD [\"echo hi\"]\n"
    ));
    b.build_ok(&[]);
    let c = image_config(&b, "app");
    let cfg = &c["config"];
    assert_eq!(cfg["Labels"]["org.example.a"], "1");
    assert_eq!(cfg["Labels"]["b c"], "d e");
    assert_eq!(cfg["Labels"]["maintainer"], "someone@example.org");
    assert_eq!(c["author"], "someone@example.org");
    let env: Vec<&str> = cfg["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"C=1-two words"), "{env:?}");
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert!(cfg["ExposedPorts"].get("80/tcp").is_some(), "{cfg}");
    assert!(cfg["ExposedPorts"].get("443/udp").is_some(), "{cfg}");
    assert!(
        cfg["Volumes"].get("/data").is_some() && cfg["Volumes"].get("/cache").is_some(),
        "{cfg}"
    );
    assert_eq!(cfg["StopSignal"], "SIGTERM");
    assert_eq!(
        cfg["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "test -e /"])
    );
    assert_eq!(cfg["Healthcheck"]["Interval"], 30_000_000_000u64);
    assert_eq!(cfg["Healthcheck"]["Retries"], 2);
    assert_eq!(cfg["OnBuild"], serde_json::json!(["RUN echo child"]));
    assert_eq!(cfg["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(cfg["User"], "app:app");
    assert_eq!(cfg["WorkingDir"], "/w");
    assert_eq!(cfg["Entrypoint"], serde_json::json!(["sh", "-c"]));
    assert_eq!(cfg["Cmd"], serde_json::json!(["echo hi"]));
    // One history entry per instruction after FROM (WORKDIR created /w: a layer).
    let hist = c["history"].as_array().unwrap();
    let mine: Vec<&serde_json::Value> = hist.iter().skip(1).collect();
    assert_eq!(mine.len(), 15, "{hist:?}");
    let workdir = mine
        .iter()
        .find(|h| h["created_by"] == "WORKDIR /w")
        .unwrap();
    assert!(workdir.get("empty_layer").is_none() || workdir["empty_layer"] == false);
    let env_entry = mine
        .iter()
        .find(|h| h["created_by"] == "ENV A=1 B=two words")
        .unwrap();
    assert_eq!(env_entry["empty_layer"], true);
    let (_, out) = b.run(&["app"]);
    assert_eq!(out, "hi\n");
    // `layerfs history` lists every step, newest first, config-only ones with no layer.
    let h = b.layerfs(&["history", "app"]);
    let h = String::from_utf8_lossy(&h.stdout);
    assert_eq!(h.lines().count(), 1 + 1 + 15, "{h}");
    assert!(
        h.lines().nth(1).unwrap().contains("CMD [\"echo hi\"]"),
        "{h}"
    );
    // A platform other than this host's is refused (exit 2).
    b.containerfile("FROM --platform=linux/s390x base\n");
    let (code, _, err) = b.build(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("this host builds"), "{err}");
}

#[test]
fn a_rebuild_that_changes_nothing_writes_nothing() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    app_project(&b);
    // Files changed in the last 2 s are hashed again at every build (their stat may not move
    // when they change again), so the context must be older than that.
    std::thread::sleep(Duration::from_millis(2100));
    b.build_ok(&[]);
    // Every file the store holds, with its modification time.
    let snapshot = |b: &Bench| {
        let mut out = Vec::new();
        let mut todo = vec![b.store()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = fs::symlink_metadata(e.path()).unwrap();
                if md.is_dir() && !e.path().starts_with(b.store().join("layers")) {
                    todo.push(e.path());
                } else if !md.is_dir() {
                    out.push((e.path(), md.modified().unwrap()));
                }
            }
        }
        out.sort();
        out
    };
    let before = snapshot(&b);
    // In another second than the first build: the image's creation time is not the clock's.
    std::thread::sleep(Duration::from_millis(1100));
    let err = b.build_ok(&[]);
    assert!(outcomes(&err).iter().all(|(_, o)| o == "CACHED"), "{err}");
    assert_eq!(snapshot(&b), before, "a no-op rebuild wrote to the store");
}

/// Modification times of everything under `root`, by relative path (access times change as
/// anything reads the files).
fn mtimes(root: &std::path::Path) -> std::collections::BTreeMap<PathBuf, (i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                (md.mtime(), md.mtime_nsec()),
            );
            if md.is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

/// Every xattr of every object below `root`, private ones included (markers, origins).
fn all_xattrs(
    root: &std::path::Path,
) -> std::collections::BTreeMap<PathBuf, Vec<(String, Vec<u8>)>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let mut x: Vec<(String, Vec<u8>)> = common::listxattr(&p)
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .map(|n| {
                    let v = common::getxattr(&p, &n).unwrap_or_default();
                    (n, v)
                })
                .collect();
            x.sort();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), x);
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

/// Each layer `app` added to `base` is, in `b`'s store, exactly what its blob extracts to in
/// another store (a layer depends only on its tar): objects, owners, modes, contents, links,
/// mtimes to the nanosecond and every xattr.
fn assert_layers_are_their_blobs(b: &Bench) {
    let cfg = image_config(b, "app");
    let ids: Vec<String> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    // The same blobs imported into another store: extracted from the tar.
    let other = Bench::new();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(b.store().join("index.json")).unwrap()).unwrap();
    let mdesc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == "app")
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            b.store().join("blobs/sha256").join(
                mdesc["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    for (i, layer) in manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .skip(1)
    {
        let blob = b.store().join("blobs/sha256").join(
            layer["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        );
        let out = other.layerfs(&["import", blob.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mine = b.store().join("layers").join(&ids[i]);
        let theirs = other.store().join("layers").join(&ids[i]);
        common::assert_same(
            &common::snapshot(&mine),
            &common::snapshot(&theirs),
            &format!("layer {i}"),
        );
        // Whiteouts keep the time they were made at (extraction sets none).
        let times = |root: &std::path::Path| {
            let mut t = mtimes(root);
            t.retain(|p, _| {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                let md = fs::symlink_metadata(root.join(p)).unwrap();
                !(md.file_type().is_char_device() && md.rdev() == 0)
            });
            t
        };
        assert_eq!(times(&mine), times(&theirs), "layer {i}: times");
        assert_eq!(all_xattrs(&mine), all_xattrs(&theirs), "layer {i}: xattrs");
    }
}

#[test]
fn a_copied_layer_directory_is_what_its_blob_extracts_to() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    wfile(b.ctx().join("tree/a.txt"), "a\n");
    wfile(b.ctx().join("tree/sub/deep/b.sh"), "#!/bin/sh\n");
    common::chmod(b.ctx().join("tree/sub/deep/b.sh"), 0o4755);
    mkdirp(b.ctx().join("tree/empty"));
    common::chmod(b.ctx().join("tree/empty"), 0o700);
    symlink("sub/deep/b.sh", b.ctx().join("tree/link")).unwrap();
    wfile(b.ctx().join("top.txt"), "top\n");
    // /bin exists in the image (its directory is recreated in the layer), /opt does not.
    b.containerfile("FROM base\nCOPY --chown=7:8 tree/ /opt/tree/\nCOPY top.txt /bin/\n");
    b.build_ok(&[]);
    assert_layers_are_their_blobs(&b);
}

/// A RUN step's upper becomes its layer directory in place (not extracted again from the
/// step's tar), and is then exactly what the tar extracts to: copy-up origins and impure marks
/// gone, whiteouts and opaque marks as extraction writes them (none below an opaque
/// directory), whole-second times.
#[test]
fn a_run_layer_directory_is_its_upper_and_what_its_blob_extracts_to() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    b.containerfile(
        "FROM base\n\
         RUN mkdir -p /t/keep /t/gone/deep /t/opq/sub /t/merged && echo k >/t/keep/f && \\\n\
             ln /t/keep/f /t/keep/hl && echo g >/t/gone/deep/x && echo o >/t/opq/sub/o && \\\n\
             echo l >/t/lowerfile && echo m >/t/mod && echo x >/t/merged/x && echo y >/t/merged/y\n\
         RUN rm -rf /t/gone /t/lowerfile /t/merged/x && rm -rf /t/opq && \\\n\
             mkdir -p /t/opq/new/deeper && echo n >/t/opq/new/deeper/n && \\\n\
             touch /t/opq/new/tmp && rm /t/opq/new/tmp && echo more >>/t/mod && chmod 4755 /t/mod && \\\n\
             chown 1000:1000 /t/keep/f && chmod 600 /t/merged/y && mkfifo /t/fifo && \\\n\
             ln -s ../keep/f /t/opq/link && echo h >/t/h1 && ln /t/h1 /t/h2 && mkdir /t/newdir && \\\n\
             touch /t/newdir/a && rm /t/newdir/a\n",
    );
    let out = Command::new(common::bin())
        .arg("--root")
        .arg(b.store())
        .args(["build", "-t", "app"])
        .arg(b.ctx())
        .env("RUST_LOG", "layerfs::store=debug")
        .output()
        .expect("run layerfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build failed:\n{err}");
    assert_eq!(
        err.matches("adopted the step's upper as layer").count(),
        2,
        "both RUN layers are their uppers:\n{err}"
    );
    assert_layers_are_their_blobs(&b);
    // What the steps did shows through a mount of the image (a copy-up breaks a hard link, as
    // in kernel overlayfs without `index`).
    let (code, shown) = b.run(&[
        "app",
        "sh",
        "-c",
        "ls -a /t /t/opq /t/opq/new /t/merged /t/newdir | tr '\\n' ' '; stat -c '%n %a %u:%g %h' /t/mod /t/keep/f /t/keep/hl /t/merged/y /t/h1; cat /t/mod",
    ]);
    assert_eq!(code, 0, "{shown}");
    assert_eq!(
        shown,
        "/t: . .. fifo h1 h2 keep merged mod newdir opq  /t/merged: . .. y  /t/newdir: . ..  \
         /t/opq: . .. link new  /t/opq/new: . .. deeper /t/mod 4755 0:0 1\n\
         /t/keep/f 644 1000:1000 1\n/t/keep/hl 644 0:0 2\n/t/merged/y 600 0:0 1\n\
         /t/h1 644 0:0 2\nm\nmore\n"
    );
    b.assert_clean();
}
