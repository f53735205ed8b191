//! The build cache shared through a registry (`layerfs build --cache-to/--cache-from`)
//! against the real distribution server (`docker-registry`): a second store that has only
//! the base image builds the same Containerfile with every step pulled and none run, to the
//! same manifest digest; a third store whose context has one changed file pulls the steps
//! before the change and explains the rest from the shared record; a registry that lies
//! (an entry whose layer is not the diffID it claims, a layer blob whose bytes were
//! changed) is refused and the step runs, with nothing bad stored; an unreachable cache is
//! a warning.
//!
//! Needs root, /dev/fuse, runc, busybox and docker-registry; skipped without them, except
//! under `CI=true`, where they fail.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{can_mount, wfile};
use layerfs::build::remote;
use layerfs::digest::Digest;

const EPOCH: &str = "1700000000";

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is missing and CI=true (scripts/test.sh installs it)");
        }
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

fn ready() -> bool {
    can_mount() && have("runc") && have("busybox") && have("docker-registry")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `docker-registry serve` on loopback, killed (by pid) on drop.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = free_port();
        let storage = dir.join("registry-data");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
        }
    }

    fn repo(&self) -> String {
        format!("localhost:{}/cache/app", self.port)
    }

    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// One HTTP/1.1 request; (status, body).
    fn http(&self, method: &str, path: &str, ctype: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\
             Content-Length: {}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n",
            self.port,
            body.len()
        );
        if let Some(c) = ctype {
            req.push_str(&format!("Content-Type: {c}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut out = resp[split + 4..].to_vec();
        self.last_location(&head);
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            out = dechunk(&out);
        }
        (status, out)
    }

    fn last_location(&self, head: &str) {
        let loc = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Location: ")
                    .or_else(|| l.strip_prefix("location: "))
            })
            .map(str::to_string);
        LOCATION.with(|c| *c.borrow_mut() = loc);
    }

    /// Upload `data` as a blob of repository `cache/app`.
    fn put_blob(&self, data: &[u8]) -> String {
        let d = Digest::of(data).to_string();
        let (st, _) = self.http("POST", "/v2/cache/app/blobs/uploads/", None, &[]);
        assert_eq!(st, 202);
        let loc = LOCATION.with(|c| c.borrow().clone()).unwrap();
        let path = loc
            .split_once(&format!("localhost:{}", self.port))
            .map(|(_, p)| p.to_string())
            .unwrap_or(loc);
        let sep = if path.contains('?') { '&' } else { '?' };
        let (st, body) = self.http(
            "PUT",
            &format!("{path}{sep}digest={}", d.replace(':', "%3A")),
            Some("application/octet-stream"),
            data,
        );
        assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
        d
    }

    fn put_manifest(&self, tag: &str, bytes: &[u8]) {
        let (st, body) = self.http(
            "PUT",
            &format!("/v2/cache/app/manifests/{tag}"),
            Some("application/vnd.oci.image.manifest.v1+json"),
            bytes,
        );
        assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    }

    fn get_manifest(&self, tag: &str) -> serde_json::Value {
        let (st, body) = self.http("GET", &format!("/v2/cache/app/manifests/{tag}"), None, &[]);
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

thread_local! {
    static LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stores ("machines") and contexts in one directory, and the base tar they import.
struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            dir: tempfile::tempdir().unwrap(),
        };
        common::busybox_base_tar(lab.dir.path());
        lab
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A machine: a store holding the base image (the same digest everywhere) and its own
    /// copy of the project, at its own path.
    fn machine(&self, name: &str) -> Machine {
        let m = Machine {
            store: self.p(&format!("{name}/store")),
            ctx: self.p(&format!("{name}/src/project")),
        };
        let tar = self.p("base.tar");
        let out = m.layerfs(&[
            "import",
            tar.to_str().unwrap(),
            "--name",
            "base",
            "--source-date-epoch",
            EPOCH,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        project(&m.ctx);
        m
    }
}

struct Machine {
    store: PathBuf,
    ctx: PathBuf,
}

impl Machine {
    fn layerfs(&self, args: &[&str]) -> Output {
        Command::new(common::bin())
            .arg("--root")
            .arg(&self.store)
            .args(args)
            .env("HOME", self.store.parent().unwrap())
            .env("REGISTRY_AUTH_FILE", self.store.with_file_name("auth.json"))
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RUST_LOG")
            .output()
            .expect("run layerfs")
    }

    /// `layerfs build -t app --source-date-epoch N --tls-verify=false EXTRA CTX`: (stdout,
    /// stderr, time), asserting success.
    fn build(&self, extra: &[&str]) -> (String, String, Duration) {
        let mut args = vec![
            "build",
            "-t",
            "app",
            "--source-date-epoch",
            EPOCH,
            "--tls-verify=false",
        ];
        args.extend_from_slice(extra);
        let ctx = self.ctx.to_str().unwrap().to_string();
        args.push(&ctx);
        let t = Instant::now();
        let out = self.layerfs(&args);
        let took = t.elapsed();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "build failed:\n{stderr}");
        (stdout, stderr, took)
    }

    fn fsck_clean(&self) {
        let out = self.layerfs(&["fsck", "--store"]);
        assert!(
            out.status.success(),
            "fsck --store: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let tmp: Vec<_> = fs::read_dir(self.store.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "staging left: {tmp:?}");
    }

    /// Every cache entry of the store: (key, entry).
    fn entries(&self) -> Vec<(String, serde_json::Value)> {
        fs::read_dir(self.store.join("cache/entries"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let v: serde_json::Value =
                    serde_json::from_slice(&fs::read(e.path()).unwrap()).unwrap();
                (v["key"].as_str().unwrap().to_string(), v)
            })
            .collect()
    }

    /// The entry whose history line contains `text`.
    fn entry_of(&self, text: &str) -> (String, serde_json::Value) {
        self.entries()
            .into_iter()
            .find(|(_, v)| {
                v["history"]["created_by"]
                    .as_str()
                    .is_some_and(|c| c.contains(text))
            })
            .unwrap_or_else(|| panic!("no entry for {text}"))
    }
}

fn project(ctx: &Path) {
    wfile(ctx.join("package.json"), "{\"deps\": 1}\n");
    wfile(ctx.join("src/server.js"), "console.log('v1')\n");
    wfile(ctx.join("src/lib/util.js"), "module.exports = 1\n");
    wfile(
        ctx.join("Containerfile"),
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

/// `(step, outcome)` of the plain progress lines: `CACHED`, `CACHED (from X)` or
/// `running: reason`.
fn outcomes(err: &str) -> Vec<(usize, String)> {
    err.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (head, tail) = rest.split_once("] ")?;
            if head.contains('/') {
                return None;
            }
            let n: usize = head.rsplit(' ').next()?.parse().ok()?;
            (tail.starts_with("CACHED") || tail.starts_with("running: "))
                .then(|| (n, tail.to_string()))
        })
        .collect()
}

fn step(o: &[(usize, String)], n: usize) -> String {
    o.iter()
        .find(|(s, _)| *s == n)
        .map(|(_, t)| t.clone())
        .unwrap_or_default()
}

fn warnings(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("warning: ")).collect()
}

#[test]
fn a_second_store_pulls_every_step_and_a_third_explains_its_misses() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    let reg = Registry::start(lab.dir.path());
    let repo = reg.repo();
    let a = lab.machine("a");

    // Machine A: a cold build that exports its cache.
    let (out_a, err_a, cold) = a.build(&["--cache-to", &format!("docker://{repo}")]);
    let digest_a = out_a.trim().to_string();
    assert!(
        err_a.contains(&format!(
            "exported the build cache to {repo}: 8 entries (8 pushed"
        )),
        "{err_a}"
    );
    assert!(warnings(&err_a).is_empty(), "{err_a}");
    // Entries are tagged by key; a config-only step carries the OCI empty descriptor.
    let (key, _) = a.entry_of("USER app");
    let m = reg.get_manifest(&format!("lfc-{}", key.strip_prefix("sha256:").unwrap()));
    assert_eq!(m["artifactType"], remote::ARTIFACT_TYPE);
    assert_eq!(m["config"]["mediaType"], remote::MT_ENTRY);
    assert_eq!(m["layers"][0]["mediaType"], remote::MT_EMPTY);
    let (key, entry) = a.entry_of("installed deps");
    let m = reg.get_manifest(&format!("lfc-{}", key.strip_prefix("sha256:").unwrap()));
    assert_eq!(m["layers"][0], entry["layer"]["blob"]);

    // Exporting again pushes nothing.
    let (_, err, _) = a.build(&["--cache-to", &repo]);
    assert!(
        err.contains("8 entries (0 pushed, 8 already there), record unchanged, 0 blobs uploaded"),
        "{err}"
    );

    // Machine B: the base image only. Every step is pulled, none runs, same image.
    let b = lab.machine("b");
    let (out_b, err_b, warm) = b.build(&["--cache-from", &repo, "--progress", "json"]);
    let events: Vec<serde_json::Value> = out_b
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ends: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "end" && e["step"].as_u64().unwrap() > 2)
        .collect();
    assert_eq!(ends.len(), 8, "{out_b}");
    for e in &ends {
        assert_eq!(e["cached"], true, "{e}");
        assert_eq!(e["cached_from"], repo.as_str(), "{e}");
    }
    assert!(!events.iter().any(|e| e["event"] == "output"), "{out_b}");
    let done = events.iter().find(|e| e["event"] == "done").unwrap();
    assert_eq!(done["manifest"], digest_a.as_str(), "{out_b}\n{err_b}");
    assert!(warnings(&err_b).is_empty(), "{err_b}");
    eprintln!("cold build on A: {cold:?}; the same build on an empty B from the cache: {warm:?}");
    let run = b.layerfs(&["run", "--rm", "app"]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "built-1\ninstalled deps of {\"deps\": 1}\n1000\nlib\nserver.js\n"
    );
    b.fsck_clean();
    // B exports to another repository of the registry: the layers it pulled are mounted
    // from where it pulled them (registry/sources.json), not uploaded again.
    let other = format!("localhost:{}/cache/other", reg.port);
    let (_, err, _) = b.build(&["--cache-to", &other]);
    assert!(
        err.contains(&format!(
            "exported the build cache to {other}: 8 entries (8 pushed"
        )) && err.contains(", 5 mounted, "),
        "{err}"
    );
    // A rebuild on B is local: no registry needed.
    let (_, err, _) = b.build(&["--cache-from", "localhost:1/nothing"]);
    assert!(outcomes(&err).iter().all(|(_, o)| o == "CACHED"), "{err}");

    // Machine C: the project with one source line changed, and no earlier build. The steps
    // before the change are pulled; the changed COPY runs and says why (the record came
    // from the registry, its listing too), what follows runs after it.
    let c = lab.machine("c");
    wfile(c.ctx.join("src/server.js"), "console.log('v2')\n");
    let (_, err_c, _) = c.build(&["--cache-from", &repo]);
    let o = outcomes(&err_c);
    for n in 3..=6 {
        assert_eq!(
            step(&o, n),
            format!("CACHED (from {repo})"),
            "step {n}:\n{err_c}"
        );
    }
    assert_eq!(step(&o, 7), "running: src/server.js modified", "{err_c}");
    assert!(step(&o, 8).starts_with("running: after step 7"), "{err_c}");
    assert!(
        err_c.contains("misses are explained against the last build"),
        "{err_c}"
    );
    assert!(
        err_c.contains("4 steps pulled from the shared cache"),
        "{err_c}"
    );
    eprintln!(
        "{}",
        err_c
            .lines()
            .find(|l| l.contains("pulled from the shared cache"))
            .unwrap()
    );
    assert!(warnings(&err_c).is_empty(), "{err_c}");
    c.fsck_clean();

    // The same change on B (which has its own record now): explained locally.
    wfile(b.ctx.join("src/server.js"), "console.log('v2')\n");
    let (_, err, _) = b.build(&["--cache-from", &repo]);
    let o = outcomes(&err);
    assert_eq!(step(&o, 6), "CACHED", "{err}");
    assert_eq!(step(&o, 7), "running: src/server.js modified", "{err}");
}

#[test]
fn a_lying_registry_is_refused_and_the_step_runs() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    let reg = Registry::start(lab.dir.path());
    let repo = reg.repo();
    let a = lab.machine("a");
    a.build(&["--cache-to", &repo]);

    // The entry of the first RUN, pushed again claiming another diffID for the same layer
    // blob: consistent digests, a lie about the content.
    let (key, entry) = a.entry_of("installed deps");
    let mut lie = entry.clone();
    let real_diff_id = entry["layer"]["diff_id"].as_str().unwrap().to_string();
    lie["layer"]["diff_id"] = Digest::of(b"something else").to_string().into();
    lie.as_object_mut().unwrap().remove("last_used");
    let config = serde_json::to_vec_pretty(&lie).unwrap();
    reg.put_blob(&config);
    let layer: layerfs::store::model::Descriptor =
        serde_json::from_value(entry["layer"]["blob"].clone()).unwrap();
    let manifest = remote::entry_manifest(&config, Some(&layer));
    let key_hex = key.strip_prefix("sha256:").unwrap();
    reg.put_manifest(&format!("lfc-{key_hex}"), &manifest);
    // And the second RUN's layer blob with its bytes changed on the registry's disk.
    let (_, entry2) = a.entry_of("ls -R src");
    let blob2 = entry2["layer"]["blob"]["digest"].as_str().unwrap();
    let data = reg.blob_data(blob2);
    let mut bytes = fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last / 2] ^= 0xff;
    fs::write(&data, &bytes).unwrap();

    let b = lab.machine("b");
    let (_, err, _) = b.build(&["--cache-from", &repo]);
    let o = outcomes(&err);
    let w = warnings(&err);
    assert_eq!(w.len(), 2, "{err}");
    assert!(
        w[0].contains(&format!("refused the cache entry {}", &key_hex[..12]))
            && w[0].contains(&repo)
            && w[0].contains(&format!("its diffID is {real_diff_id}")),
        "{err}"
    );
    assert!(w[1].contains("hash to"), "{err}");
    assert_eq!(step(&o, 5), format!("CACHED (from {repo})"), "{err}");
    assert!(step(&o, 6).starts_with("running: "), "{err}");
    // The rerun made the same layer, so the next steps' keys are A's again.
    assert_eq!(step(&o, 7), format!("CACHED (from {repo})"), "{err}");
    assert!(step(&o, 8).starts_with("running: "), "{err}");
    assert_eq!(step(&o, 9), format!("CACHED (from {repo})"), "{err}");
    // Nothing of the lies was stored: the entry has the real diffID, no partial download is
    // left, and the store checks clean.
    let (_, stored) = b.entry_of("installed deps");
    assert_eq!(stored["layer"]["diff_id"], real_diff_id.as_str());
    assert!(
        !b.store
            .join("layers")
            .join(Digest::of(b"something else").hex())
            .exists()
    );
    let partial = fs::read_dir(b.store.join("registry/partial"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(partial, 0);
    b.fsck_clean();
}

#[test]
fn an_unreachable_cache_is_a_warning() {
    if !ready() {
        return;
    }
    let lab = Lab::new();
    let a = lab.machine("a");
    let nowhere = format!("localhost:{}/cache", free_port());
    // Pulling: one warning, every step runs, the build succeeds.
    let t = Instant::now();
    let (out, err, _) = a.build(&["--cache-from", &nowhere, "--cache-from", &nowhere]);
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let w = warnings(&err);
    assert_eq!(w.len(), 2, "one per source:\n{err}");
    assert!(w[0].contains(&format!("cache source {nowhere}")), "{err}");
    assert!(w[0].contains("building without it"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(
        outcomes(&err)
            .iter()
            .filter(|(n, _)| *n > 2)
            .all(|(_, o)| o.starts_with("running: ")),
        "{err}"
    );
    // Pushing: one warning, exit 0, the image is there.
    let (out2, err, _) = a.build(&["--cache-to", &nowhere]);
    assert_eq!(out2, out);
    let w = warnings(&err);
    assert_eq!(w.len(), 1, "{err}");
    assert!(
        w[0].contains(&format!("exporting the build cache to {nowhere} failed")),
        "{err}"
    );
    a.fsck_clean();
}
