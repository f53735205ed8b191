//! `layerfs push` and `pull` against the real distribution server (`docker-registry`): plain
//! HTTP, TLS with a private CA and htpasswd basic auth, interop with skopeo both ways, an
//! image index, a registry killed in the middle of a pull (resumed), a registry answering
//! 503s, and a registry whose stored bytes were tampered with (refused, store unchanged).
//!
//! Each test starts its own registry on a free loopback port with a temporary config and
//! kills it (by pid) when done. Without root or `docker-registry`/`skopeo`/`htpasswd`/
//! `openssl` the tests are skipped, except under `CI=true`, where they fail.

mod store_common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use store_common::{Env, assert_same, bin, expect_failure, have, root, run, snapshot};

fn ready() -> bool {
    root() && have("docker-registry") && have("skopeo") && have("htpasswd") && have("openssl")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// TLS material and a password file for the secured registry.
struct Secure {
    cert_dir: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    htpasswd: PathBuf,
}

fn make_secure(dir: &Path) -> Secure {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let d = dir.display();
    // A private CA (its certificate is all the client gets) and a server certificate it
    // signs for localhost and 127.0.0.1.
    store_common::sh(&format!(
        "cd {d}
         openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out certs/ca.crt -days 2 \
            -subj /CN=layerfs-test-ca 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj /CN=localhost 2>/dev/null
         printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n\
keyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=serverAuth\\n' >ext.cnf
         openssl x509 -req -in server.csr -CA certs/ca.crt -CAkey ca.key -CAcreateserial \
            -out server.crt -days 2 -extfile ext.cnf 2>/dev/null
         htpasswd -Bbn tester s3cret >htpasswd 2>/dev/null"
    ));
    Secure {
        cert_dir: certs,
        server_crt: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        htpasswd: dir.join("htpasswd"),
    }
}

/// A running `docker-registry serve`, killed on drop.
struct Registry {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    storage: PathBuf,
}

impl Registry {
    fn start(dir: &Path, secure: Option<&Secure>) -> Registry {
        Registry::start_with(dir, secure, "")
    }

    /// With `extra` appended to the config (an `auth:` section).
    fn start_with(dir: &Path, secure: Option<&Secure>, extra: &str) -> Registry {
        let port = free_port();
        let storage = dir.join("registry-data");
        let config = dir.join(format!("registry-{port}.yml"));
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some(s) = secure {
            yml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                s.server_crt.display(),
                s.server_key.display(),
                s.htpasswd.display()
            ));
        }
        yml.push_str(extra);
        std::fs::write(&config, yml).unwrap();
        let mut r = Registry {
            child: None,
            port,
            config,
            storage,
        };
        r.restart();
        r
    }

    /// Start (again) on the same port and storage.
    fn restart(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the server (by its pid) and reap it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// The file holding blob `digest` in the registry's storage.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `layerfs --root STORE ARGS` with the auth files pointed into the test directory (never
/// the user's own) and extra environment.
fn lfs(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("--root").arg(env.store()).args(args);
    cmd.env("HOME", env.path("home"))
        .env("XDG_RUNTIME_DIR", env.path("run"))
        .env("REGISTRY_AUTH_FILE", env.path("run/auth.json"))
        .env_remove("DOCKER_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("RUST_LOG");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).output().expect("run layerfs")
}

fn ok(env: &Env, args: &[&str]) -> String {
    ok_env(env, args, &[])
}

fn ok_env(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> String {
    let out = lfs(env, args, vars);
    assert!(
        out.status.success(),
        "layerfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(env: &Env, args: &[&str], want: &str) -> String {
    expect_failure(lfs(env, args, &[]), want)
}

/// Incompressible bytes (xorshift), reproducible by seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Import a two-layer image `name`: a gzip layer with `big` bytes of noise plus small files,
/// and a plain tar layer on top.
fn make_image(env: &Env, name: &str, big: usize, seed: u64) {
    let t = env.path(&format!("src-{name}"));
    std::fs::create_dir_all(t.join("l1/etc")).unwrap();
    std::fs::create_dir_all(t.join("l1/bin")).unwrap();
    std::fs::create_dir_all(t.join("l2/app")).unwrap();
    std::fs::write(t.join("l1/etc/hello"), format!("hello {seed}\n")).unwrap();
    std::fs::write(t.join("l1/bin/blob"), noise(seed, big)).unwrap();
    std::os::unix::fs::symlink("../etc/hello", t.join("l1/bin/link")).unwrap();
    std::fs::write(t.join("l2/app/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let d = t.display();
    store_common::sh(&format!(
        "cd {d} && tar -C l1 -czf l1.tar.gz . && tar -C l2 -cf l2.tar ."
    ));
    ok(
        env,
        &[
            "import",
            &format!("{d}/l1.tar.gz"),
            "--name",
            &format!("{name}-base"),
        ],
    );
    ok(
        env,
        &[
            "import",
            &format!("{d}/l2.tar"),
            "--parent",
            &format!("{name}-base"),
            "--name",
            name,
        ],
    );
}

/// (manifest digest, diffIDs) of a stored image.
fn image_of(env: &Env, name: &str) -> (String, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(&ok(env, &["images", "--json"])).unwrap();
    let img = v
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no image {name} in {v}"));
    let layers = img["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    (img["manifest"].as_str().unwrap().to_string(), layers)
}

/// The extracted trees of an image's layers.
fn trees(env: &Env, diff_ids: &[String]) -> Vec<Vec<String>> {
    diff_ids
        .iter()
        .map(|d| {
            snapshot(
                &env.store()
                    .join("layers")
                    .join(d.strip_prefix("sha256:").unwrap()),
            )
        })
        .collect()
}

fn fsck_clean(env: &Env) {
    let out = ok(env, &["fsck", "--store"]);
    assert!(out.contains("0 problems"), "{out}");
}

fn partials(env: &Env) -> usize {
    std::fs::read_dir(env.store().join("registry/partial"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn skopeo(args: &[&str]) -> String {
    run(Command::new("skopeo").args(args))
}

#[test]
fn push_then_pull_plain_http() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let b = Env::new();
    let reg = Registry::start(a.dir.path(), None);
    make_image(&a, "app", 3 << 20, 1);
    let (digest, ids) = image_of(&a, "app");
    let dest = format!("docker://{}/team/app:v1", reg.host());
    let pushed = ok(&a, &["push", "app", &dest, "--tls-verify=false"]);
    assert_eq!(
        pushed.trim(),
        digest,
        "push prints the stored manifest digest"
    );

    // skopeo sees what layerfs pushed, with the same digest and layers.
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/team/app:v1", reg.host()),
    ]))
    .unwrap();
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);

    // Pull into a fresh store: same manifest digest, same layers, same trees.
    let t = Instant::now();
    let out = ok(&b, &["pull", &dest, "--tls-verify=false"]);
    eprintln!("pull of a 3 MiB image: {:?}", t.elapsed());
    assert_eq!(out.trim(), digest);
    let (digest_b, ids_b) = image_of(&b, &format!("{}/team/app:v1", reg.host()));
    assert_eq!((digest_b.as_str(), &ids_b), (digest.as_str(), &ids));
    for (x, y) in trees(&a, &ids).iter().zip(trees(&b, &ids)) {
        assert_same(x, &y, "pulled layer");
    }
    fsck_clean(&b);
    assert_eq!(partials(&b), 0);

    // Again: nothing to fetch; a name of our own; by digest (needs --name).
    let again = lfs(
        &b,
        &["-v", "pull", &dest, "--tls-verify=false", "--name", "mine"],
        &[],
    );
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 fetched"));
    assert_eq!(image_of(&b, "mine").0, digest);
    let by_digest = format!("{}/team/app@{digest}", reg.host());
    fails(
        &b,
        &["pull", &by_digest, "--tls-verify=false"],
        "needs --name",
    );
    ok(
        &b,
        &["pull", &by_digest, "--tls-verify=false", "--name", "pinned"],
    );
    assert_eq!(image_of(&b, "pinned").0, digest);

    // Pushing again uploads nothing; pushing to another repository mounts every blob from
    // the one the store remembers.
    let out = lfs(&a, &["-v", "push", "app", &dest, "--tls-verify=false"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0 blobs uploaded"),
        "{out:?}"
    );
    let other = format!("{}/other/app:v2", reg.host());
    let out = lfs(
        &a,
        &["-v", "push", "app", &other, "--tls-verify=false"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("0 blobs uploaded") && err.contains("3 mounted"),
        "{err}"
    );
    let sources = std::fs::read_to_string(a.store().join("registry/sources.json")).unwrap();
    assert!(
        sources.contains("/team/app") && sources.contains("/other/app"),
        "{sources}"
    );
    // A store pushing the image pulled from there mounts too (b remembers team/app).
    let out = lfs(
        &b,
        &[
            "-v",
            "push",
            "mine",
            &format!("{}/third/app", reg.host()),
            "--tls-verify=false",
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 mounted"),
        "{out:?}"
    );

    // By digest: only the image's own.
    let by_digest = format!("{}/bydigest/app@{digest}", reg.host());
    assert_eq!(
        ok(&a, &["push", "app", &by_digest, "--tls-verify=false"]).trim(),
        digest
    );
    let (other_digest, _) = image_of(&a, "app-base");
    fails(
        &a,
        &["push", "app-base", &by_digest, "--tls-verify=false"],
        &format!("the image's manifest is {other_digest}"),
    );

    // Usage and reference errors.
    fails(
        &a,
        &["push", "nope", &dest, "--tls-verify=false"],
        "no image",
    );
    fails(
        &a,
        &["pull", "team/app", "--tls-verify=false"],
        "not a registry host",
    );
    fails(
        &b,
        &[
            "pull",
            &format!("{}/team/missing:v1", reg.host()),
            "--tls-verify=false",
        ],
        "not found",
    );
    let out = lfs(&a, &["pull"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // Plain HTTP needs --tls-verify=false: the TLS attempt fails with a hint.
    fails(&b, &["pull", &dest], "--tls-verify=false");

    // gc removes partial downloads nobody holds; the pulled images stay whole.
    let stale = b.store().join("registry/partial").join("ab".repeat(32));
    std::fs::write(&stale, b"half a blob").unwrap();
    ok(&b, &["gc"]);
    assert!(!stale.exists());
    fsck_clean(&b);
    assert_eq!(image_of(&b, "mine").0, digest);
}

#[test]
fn skopeo_interop_and_index() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let b = Env::new();
    let reg = Registry::start(a.dir.path(), None);
    make_image(&a, "app", 1 << 20, 2);
    let (app_digest, _) = image_of(&a, "app");
    let (base_digest, _) = image_of(&a, "app-base");
    let store = a.store();
    let s = store.display();

    // Docker schema2, converted by skopeo: layerfs stores it byte for byte.
    let v2s2 = format!("{}/sk/app:v2s2", reg.host());
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &format!("oci:{s}:app"),
        &format!("docker://{v2s2}"),
    ]);
    let want: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{v2s2}"),
    ]))
    .unwrap();
    let got = ok(&b, &["pull", &v2s2, "--tls-verify=false"]);
    assert_eq!(got.trim(), want["Digest"].as_str().unwrap());
    assert_ne!(got.trim(), app_digest, "skopeo converted the manifest");
    fsck_clean(&b);
    // And back out: the pushed Docker manifest keeps its digest.
    let back = format!("{}/sk/back:1", reg.host());
    assert_eq!(ok(&b, &["push", &v2s2, &back, "--tls-verify=false"]), got);

    // An image index with two platforms, pushed by skopeo --all: the host's is chosen,
    // --platform picks another, a missing one is refused with the list.
    let layout = a.path("layout");
    std::fs::create_dir_all(layout.join("blobs")).unwrap();
    store_common::sh(&format!(
        "cp -r {s}/blobs/sha256 {}/blobs/ && cp {s}/oci-layout {}/",
        layout.display(),
        layout.display()
    ));
    let manifest_size = |d: &str| {
        std::fs::metadata(
            store
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
        .len()
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": base_digest,
             "size": manifest_size(&base_digest),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": app_digest,
             "size": manifest_size(&app_digest),
             "platform": {"os": "linux", "architecture": layerfs::store::images::host_arch()}},
        ]
    })
    .to_string();
    let index_digest = layerfs::digest::Digest::of(index.as_bytes());
    std::fs::write(layout.join("blobs/sha256").join(index_digest.hex()), &index).unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest.to_string(), "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"}}]})
        .to_string(),
    )
    .unwrap();
    let multi = format!("{}/sk/multi:1", reg.host());
    skopeo(&[
        "copy",
        "-q",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{multi}"),
    ]);
    // skopeo compresses the plain layer for the registry, so the manifests it pushed are
    // not ours: ask the registry which they are.
    let pushed_index: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{multi}"),
    ]))
    .unwrap();
    let entry = |arch: &str| {
        pushed_index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let host_digest = entry(layerfs::store::images::host_arch());
    assert_eq!(
        ok(&b, &["pull", &multi, "--tls-verify=false"]).trim(),
        host_digest
    );
    let arm = ok(
        &b,
        &[
            "pull",
            &multi,
            "--tls-verify=false",
            "--platform",
            "linux/arm64",
            "--name",
            "arm",
        ],
    );
    assert_eq!(arm.trim(), entry("arm64"));
    assert_ne!(entry("arm64"), host_digest);
    fails(
        &b,
        &[
            "pull",
            &multi,
            "--tls-verify=false",
            "--platform",
            "linux/s390x",
        ],
        "no linux/s390x image in the index (it has linux/arm64, linux/",
    );
    fsck_clean(&b);
}

#[test]
fn tls_private_ca_and_basic_auth() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let b = Env::new();
    let secure = make_secure(a.dir.path());
    let reg = Registry::start(a.dir.path(), Some(&secure));
    make_image(&a, "app", 1 << 20, 3);
    let (digest, _) = image_of(&a, "app");
    let dest = format!("{}/sec/app:1", reg.host());
    let certs = secure.cert_dir.to_str().unwrap();

    // Without the CA: a certificate error that says what to do.
    fails(
        &a,
        &["push", "app", &dest, "--creds", "tester:s3cret"],
        "--cert-dir",
    );
    // Without credentials, or with wrong ones: refused.
    fails(&a, &["push", "app", &dest, "--cert-dir", certs], "401");
    fails(
        &a,
        &[
            "push",
            "app",
            &dest,
            "--cert-dir",
            certs,
            "--creds",
            "tester:wrong",
        ],
        "401",
    );
    // Plain HTTP to a TLS server fails.
    assert!(
        !lfs(&a, &["push", "app", &dest, "--tls-verify=false"], &[])
            .status
            .success()
    );
    let pushed = ok(
        &a,
        &[
            "push",
            "app",
            &dest,
            "--cert-dir",
            certs,
            "--creds",
            "tester:s3cret",
        ],
    );
    assert_eq!(pushed.trim(), digest);
    // skopeo agrees (it reads the same cert dir and credentials).
    let inspect = skopeo(&[
        "inspect",
        "--cert-dir",
        certs,
        "--creds",
        "tester:s3cret",
        &format!("docker://{dest}"),
    ]);
    assert!(inspect.contains(&digest), "{inspect}");

    // login checks the password and writes the auth file; pull then needs no --creds.
    fails(
        &b,
        &[
            "login",
            &reg.host(),
            "-u",
            "tester",
            "-p",
            "nope",
            "--cert-dir",
            certs,
        ],
        "refused the credentials",
    );
    assert!(!b.path("run/auth.json").exists());
    ok(
        &b,
        &[
            "login",
            &reg.host(),
            "-u",
            "tester",
            "-p",
            "s3cret",
            "--cert-dir",
            certs,
        ],
    );
    let file = std::fs::read_to_string(b.path("run/auth.json")).unwrap();
    assert!(
        file.contains(&reg.host()) && file.contains("auth"),
        "{file}"
    );
    let got = ok(&b, &["pull", &dest, "--cert-dir", certs]);
    assert_eq!(got.trim(), digest);
    fsck_clean(&b);
    // A docker config.json is read too (base64 "auth"), and --authfile picks a file.
    ok(&b, &["logout", &reg.host()]);
    fails(
        &b,
        &["pull", &dest, "--cert-dir", certs, "--name", "x"],
        "401",
    );
    let docker = b.path("home/.docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"https://{}":{{"auth":"dGVzdGVyOnMzY3JldA=="}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    ok(
        &b,
        &["pull", &dest, "--cert-dir", certs, "--name", "viadocker"],
    );
    let own = b.path("own.json");
    ok(
        &b,
        &[
            "login",
            &reg.host(),
            "-u",
            "tester",
            "-p",
            "s3cret",
            "--cert-dir",
            certs,
            "--authfile",
            own.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read_to_string(&own).unwrap().contains(&reg.host()));
    fails(&b, &["logout", "other:1"], "not logged in");
}

/// Copy `from` to `to` at most `per_sec` bytes a second (`usize::MAX`: as fast as it comes)
/// until either side ends.
fn pump(from: &mut TcpStream, to: &mut TcpStream, per_sec: usize) {
    let mut buf = vec![0u8; 64 << 10];
    let started = Instant::now();
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
        if per_sec != usize::MAX {
            let due = Duration::from_secs_f64(sent as f64 / per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// A loopback proxy in front of the registry: passes bytes both ways, throttling what the
/// registry sends, and answers the first `fail_first` connections with a 503.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    pub connections: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: u16, bytes_per_sec: usize, fail_first: usize) -> Proxy {
        Proxy::start_both(upstream, bytes_per_sec, usize::MAX, fail_first)
    }

    /// Throttling both ways: `bytes_per_sec` of what the registry sends, `up_per_sec` of what
    /// the client sends.
    fn start_both(
        upstream: u16,
        bytes_per_sec: usize,
        up_per_sec: usize,
        fail_first: usize,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop2, conns) = (stop.clone(), connections.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let n = conns.fetch_add(1, Ordering::Relaxed);
                if n < fail_first {
                    let mut c = client;
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    pump(&mut c_in, &mut s_out, up_per_sec);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    pump(&mut s_in, &mut c_out, bytes_per_sec);
                    let _ = c_out.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            stop,
            connections,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Wait until a partial download in `env` holds at least `bytes`.
fn wait_partial(env: &Env, bytes: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let size: u64 = std::fs::read_dir(env.store().join("registry/partial"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        if size >= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the download never reached {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killed_registry_mid_pull_resumes() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let mut reg = Registry::start(a.dir.path(), None);
    // The layer is noise, so its gzip blob is as large as its data.
    make_image(&a, "big", 24 << 20, 4);
    let (digest, ids) = image_of(&a, "big");
    let dest = format!("{}/big/app:1", reg.host());
    ok(&a, &["push", "big", &dest, "--tls-verify=false"]);
    // Pull through a proxy at 12 MB/s, so the download can be cut in the middle.
    let proxy = Proxy::start(reg.port, 12 << 20, 0);
    let via = format!("localhost:{}/big/app:1", proxy.port);

    // 1. Killed and restarted while the pull runs: its retries resume the blob and finish.
    let b = Env::new();
    let mut cmd = Command::new(bin());
    cmd.args([
        "--root",
        b.store().to_str().unwrap(),
        "-v",
        "pull",
        &via,
        "--tls-verify=false",
    ])
    .env("HOME", b.path("home"))
    .env("REGISTRY_AUTH_FILE", b.path("run/auth.json"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    wait_partial(&b, 4 << 20, Duration::from_secs(30));
    reg.kill();
    std::thread::sleep(Duration::from_millis(700));
    reg.restart();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming at byte"), "no resume: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    assert_eq!(image_of(&b, &via).1, ids);
    for (x, y) in trees(&a, &ids).iter().zip(trees(&b, &ids)) {
        assert_same(x, &y, "resumed layer");
    }
    fsck_clean(&b);
    assert_eq!(partials(&b), 0);

    // 2. Killed for good: the pull gives up with one line, the store has no new image, blob
    //    or layer (only the partial download), and fsck is clean. The next pull resumes it.
    let c = Env::new();
    ok(&c, &["images"]);
    let before = c.store_state();
    let child = Command::new(bin())
        .args([
            "--root",
            c.store().to_str().unwrap(),
            "pull",
            &via,
            "--tls-verify=false",
        ])
        .env("HOME", c.path("home"))
        .env("REGISTRY_AUTH_FILE", c.path("run/auth.json"))
        .env("LAYERFS_REGISTRY_RETRIES", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_partial(&c, 4 << 20, Duration::from_secs(30));
    reg.kill();
    let out = child.wait_with_output().unwrap();
    let err = expect_failure(out, "next pull resumes");
    assert!(err.contains("kept"), "{err}");
    let after: Vec<String> = c
        .store_state()
        .into_iter()
        .filter(|l| !l.starts_with("registry/partial/"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|l| !l.starts_with("registry/partial/"))
        .collect();
    assert_eq!(before, after, "a failed pull changed the store");
    assert_eq!(partials(&c), 1);
    fsck_clean(&c);
    reg.restart();
    let out = lfs(&c, &["-v", "pull", &via, "--tls-verify=false"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("from an earlier pull") && err.contains("resuming at byte"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    fsck_clean(&c);
    assert_eq!(partials(&c), 0);
    drop(proxy);
}

#[test]
fn busy_registry_is_retried() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let reg = Registry::start(a.dir.path(), None);
    make_image(&a, "app", 1 << 20, 5);
    let (digest, _) = image_of(&a, "app");
    // The first three connections get a 503: push and pull back off and get through.
    let proxy = Proxy::start(reg.port, 1 << 30, 3);
    let dest = format!("localhost:{}/busy/app:1", proxy.port);
    assert_eq!(
        ok(&a, &["push", "app", &dest, "--tls-verify=false"]).trim(),
        digest
    );
    assert!(proxy.connections.load(Ordering::Relaxed) > 3);
    let b = Env::new();
    let proxy2 = Proxy::start(reg.port, 1 << 30, 2);
    let src = format!("localhost:{}/busy/app:1", proxy2.port);
    assert_eq!(ok(&b, &["pull", &src, "--tls-verify=false"]).trim(), digest);
    // Retries are bounded: a registry that only answers 503 fails.
    let proxy3 = Proxy::start(reg.port, 1 << 30, usize::MAX);
    let src = format!("localhost:{}/busy/app:1", proxy3.port);
    let out = lfs(
        &b,
        &["pull", &src, "--tls-verify=false"],
        &[("LAYERFS_REGISTRY_RETRIES", "1")],
    );
    expect_failure(out, "503");
}

#[test]
fn lying_registry_is_refused() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let reg = Registry::start(a.dir.path(), None);
    make_image(&a, "app", 1 << 20, 6);
    let (digest, _) = image_of(&a, "app");
    let dest = format!("{}/lie/app:1", reg.host());
    ok(&a, &["push", "app", &dest, "--tls-verify=false"]);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            a.store()
                .join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();

    let b = Env::new();
    ok(&b, &["images"]);
    let before = b.store_state();
    let unchanged = |b: &Env| {
        assert_eq!(b.store_state(), before, "a refused pull changed the store");
        fsck_clean(b);
    };
    let tamper = |digest: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let path = reg.blob_data(digest);
        let orig = std::fs::read(&path).unwrap();
        let mut bad = orig.clone();
        f(&mut bad);
        std::fs::write(&path, &bad).unwrap();
        orig
    };
    let restore = |digest: &str, orig: &[u8]| std::fs::write(reg.blob_data(digest), orig).unwrap();
    let pull = |b: &Env| lfs(b, &["pull", &dest, "--tls-verify=false"], &[]);

    // A layer with the same length and other bytes: the digest check refuses it.
    let orig = tamper(&layer, &|v| {
        let n = v.len();
        v[n / 2] ^= 0xff;
    });
    let err = expect_failure(pull(&b), "hash to");
    assert!(err.contains(&layer), "{err}");
    unchanged(&b);
    // Longer: the size check refuses it.
    tamper(&layer, &|v| v.extend_from_slice(b"more"));
    expect_failure(pull(&b), "bytes");
    unchanged(&b);
    restore(&layer, &orig);
    // The config.
    let orig = tamper(&config, &|v| {
        let i = v.iter().position(|&c| c == b'a').unwrap();
        v[i] = b'b';
    });
    expect_failure(pull(&b), &config);
    unchanged(&b);
    restore(&config, &orig);
    // The manifest (still valid JSON): it no longer hashes to what the registry claims.
    let orig = tamper(&digest, &|v| v.push(b'\n'));
    expect_failure(pull(&b), "hashes to");
    unchanged(&b);
    restore(&digest, &orig);
    // Honest again, with wrong bytes left as a partial download of the layer (another
    // registry's, say): the resumed download does not match, starts over once, goes through.
    let partial = b
        .store()
        .join("registry/partial")
        .join(layer.strip_prefix("sha256:").unwrap());
    std::fs::write(&partial, b"not the start of this layer").unwrap();
    let out = lfs(&b, &["-v", "pull", &dest, "--tls-verify=false"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("starting over"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    fsck_clean(&b);
    assert_eq!(partials(&b), 0);
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A token server of the distribution token protocol: JWTs signed (RS256, `x5c` header) by
/// a key whose certificate the registry trusts. `tester:s3cret` gets the actions asked for;
/// anyone else gets none, and a wrong password a 401.
struct TokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Scopes asked for, one entry per token request.
    requests: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(dir: &Path) -> TokenServer {
        let d = dir.display();
        store_common::sh(&format!(
            "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout token.key \
             -out token.crt -days 2 -subj /CN=token-issuer 2>/dev/null"
        ));
        let pem = std::fs::read_to_string(dir.join("token.crt")).unwrap();
        let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let key = dir.join("token.key");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, reqs) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_string();
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                let mut scopes = Vec::new();
                let mut service = String::new();
                for kv in query.split('&') {
                    match kv.split_once('=') {
                        Some(("scope", v)) => scopes.push(percent_decode(v)),
                        Some(("service", v)) => service = percent_decode(v),
                        _ => {}
                    }
                }
                reqs.lock().unwrap().push(scopes.join(" "));
                let auth = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("authorization")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                let good = format!("Basic {}", base64_std(b"tester:s3cret"));
                if !auth.is_empty() && auth != good {
                    let _ = c.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let access: Vec<serde_json::Value> = if auth == good {
                    scopes
                        .iter()
                        .filter_map(|sc| {
                            let mut p = sc.splitn(3, ':');
                            let (t, name, actions) = (p.next()?, p.next()?, p.next()?);
                            Some(serde_json::json!({"type": t, "name": name,
                                "actions": actions.split(',').collect::<Vec<_>>()}))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [der_b64]});
                let claims = serde_json::json!({
                    "iss": "test-issuer", "sub": "tester", "aud": service,
                    "exp": now + 300, "nbf": now - 10, "iat": now,
                    "jti": format!("{now}-{}", reqs.lock().unwrap().len()),
                    "access": access,
                });
                let input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-binary", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                sign.stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                let sig = sign.wait_with_output().unwrap().stdout;
                let body = serde_json::json!({"token": format!("{input}.{}", b64url(&sig)),
                    "expires_in": 300})
                .to_string();
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        TokenServer {
            port,
            stop,
            requests,
        }
    }

    /// The registry's `auth:` section for this server.
    fn registry_auth(&self, dir: &Path) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: test-registry\n    \
             issuer: test-issuer\n    rootcertbundle: {}\n",
            self.port,
            dir.join("token.crt").display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn base64_std(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn bearer_token_auth() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let b = Env::new();
    let tokens = TokenServer::start(a.dir.path());
    let reg = Registry::start_with(a.dir.path(), None, &tokens.registry_auth(a.dir.path()));
    make_image(&a, "app", 1 << 20, 7);
    let (digest, _) = image_of(&a, "app");
    let dest = format!("{}/tok/app:1", reg.host());

    // Anonymous tokens grant nothing here: refused, with the reason.
    fails(&a, &["push", "app", &dest, "--tls-verify=false"], "401");
    let before = tokens.requests.lock().unwrap().len();
    let pushed = ok(
        &a,
        &[
            "push",
            "app",
            &dest,
            "--tls-verify=false",
            "--creds",
            "tester:s3cret",
        ],
    );
    assert_eq!(pushed.trim(), digest);
    // One token for the whole push (cached per scope), asked for pull and push.
    let asked = tokens.requests.lock().unwrap()[before..].to_vec();
    assert_eq!(asked, ["repository:tok/app:pull,push"]);
    // A mount from another repository asks for a token covering both.
    let out = lfs(
        &a,
        &[
            "-v",
            "push",
            "app",
            &format!("{}/tok/other:1", reg.host()),
            "--tls-verify=false",
            "--creds",
            "tester:s3cret",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("3 mounted"), "{err}");
    assert!(
        tokens
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|s| s == "repository:tok/other:pull,push repository:tok/app:pull"),
        "{:?}",
        tokens.requests.lock().unwrap()
    );

    // login gets a token with the password (no scope), and a pull then uses the auth file.
    fails(
        &b,
        &[
            "login",
            &reg.host(),
            "-u",
            "tester",
            "-p",
            "bad",
            "--tls-verify=false",
        ],
        "refused the credentials",
    );
    ok(
        &b,
        &[
            "login",
            &reg.host(),
            "-u",
            "tester",
            "-p",
            "s3cret",
            "--tls-verify=false",
        ],
    );
    assert_eq!(
        ok(&b, &["pull", &dest, "--tls-verify=false"]).trim(),
        digest
    );
    fsck_clean(&b);
}

#[test]
fn killed_registry_mid_push_is_retried() {
    if !ready() {
        return;
    }
    let a = Env::new();
    let mut reg = Registry::start(a.dir.path(), None);
    // Noise does not compress: a 24 MiB layer is a 24 MiB blob, sent in PATCH chunks.
    make_image(&a, "big", 24 << 20, 7);
    let (digest, ids) = image_of(&a, "big");
    // Through a proxy that lets the upload through at 8 MB/s, so it can be cut in the middle.
    let proxy = Proxy::start_both(reg.port, 1 << 30, 8 << 20, 0);
    let via = format!("localhost:{}/big/pushed:1", proxy.port);
    let child = Command::new(bin())
        .args([
            "--root",
            a.store().to_str().unwrap(),
            "-v",
            "push",
            "big",
            &via,
            "--tls-verify=false",
        ])
        .env("HOME", a.path("home"))
        .env("REGISTRY_AUTH_FILE", a.path("run/auth.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the registry holds part of an upload, then kill it and start it again.
    let uploads = reg
        .storage
        .join("docker/registry/v2/repositories/big/pushed/_uploads");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let received: u64 = walk_sizes(&uploads);
        if received >= 2 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = a.store_state();
    reg.kill();
    std::thread::sleep(Duration::from_millis(700));
    reg.restart();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("again in"),
        "the upload was not retried: {err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    // The store is as it was (a push only reads it), but for where its blobs now live.
    let after: Vec<String> = a
        .store_state()
        .into_iter()
        .filter(|l| !l.starts_with("registry/"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|l| !l.starts_with("registry/"))
        .collect();
    assert_eq!(before, after);
    // What the registry holds is the whole image: a fresh store pulls it, verified.
    let b = Env::new();
    let src = format!("{}/big/pushed:1", reg.host());
    assert_eq!(ok(&b, &["pull", &src, "--tls-verify=false"]).trim(), digest);
    assert_eq!(image_of(&b, &src).1, ids);
    fsck_clean(&b);
    drop(proxy);
}

/// Bytes of every file under `dir` (0 when it does not exist).
fn walk_sizes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => walk_sizes(&p),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        })
        .sum()
}
