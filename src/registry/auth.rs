//! Registry credentials and authentication challenges.
//!
//! * Challenges: `WWW-Authenticate` headers (RFC 7235: a scheme, then `key=value` or
//!   `key="quoted"` parameters; several challenges may share one header) and token
//!   responses (`{"token"|"access_token": ..., "expires_in": N}`) of the distribution token
//!   protocol.
//! * Credentials: `--creds USER:PASS`, else the first auth file with an entry for the
//!   registry, read as podman and docker write them: `{"auths": {"KEY": {"auth":
//!   base64("user:pass")}}}`. Files, in order: `--authfile`, else `$REGISTRY_AUTH_FILE`, else
//!   `${XDG_RUNTIME_DIR}/containers/auth.json` (`/run/containers/UID/auth.json` without it);
//!   then `~/.config/containers/auth.json` and `$DOCKER_CONFIG/config.json`
//!   (`~/.docker/config.json`). A key is `HOST[:PORT]` or `HOST[:PORT]/REPO/PATH` (the most
//!   specific wins); `https://` and a trailing `/v1/` or `/v2/` are ignored, and Docker Hub's
//!   `https://index.docker.io/v1/` means `docker.io`. Credential helpers (`credsStore`,
//!   `credHelpers`) are not run.
//! * `login`/`logout` write the first file of that list (mode 0600, replaced atomically,
//!   everything else in it kept).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::sys;

/// Largest auth file read.
const MAX_AUTH_FILE: u64 = 1 << 20;

/// A user name and password (or token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print a password, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ***)", self.username)
    }
}

impl Credentials {
    /// `USER:PASS` (the password may contain ':').
    pub fn parse(s: &str) -> Result<Credentials> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err(Error::invalid("credentials must be USER:PASSWORD")),
        }
    }

    /// The `auth` field of an auth file, and the value of a Basic `Authorization` header.
    pub fn encode(&self) -> String {
        STANDARD.encode(format!("{}:{}", self.username, self.password))
    }

    /// Decode an `auth` field.
    pub fn decode(b64: &str) -> Result<Credentials> {
        let raw = STANDARD
            .decode(b64.trim())
            .or_else(|_| STANDARD_NO_PAD.decode(b64.trim()))
            .map_err(|_| Error::invalid("auth file: an \"auth\" field is not base64"))?;
        let s = String::from_utf8(raw)
            .map_err(|_| Error::invalid("auth file: an \"auth\" field is not UTF-8"))?;
        Credentials::parse(&s)
            .map_err(|_| Error::invalid("auth file: an \"auth\" field is not user:password"))
    }
}

// ---------------------------------------------------------------------------------------------
// Challenges

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercase scheme: `basic`, `bearer`, ...
    pub scheme: String,
    /// Parameters with lowercase names.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] == b' ' || self.s[self.i] == b'\t') {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.i < self.s.len() && is_tchar(self.s[self.i]) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn quoted(&mut self) -> Option<String> {
        // At '"': read to the closing quote, with backslash escapes.
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => return Some(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                c => out.push(c),
            }
        }
        None
    }
    /// Whether a `token =` follows here (a parameter, not a new challenge).
    fn param_follows(&self) -> bool {
        let mut j = self.i;
        while j < self.s.len() && is_tchar(self.s[j]) {
            j += 1;
        }
        if j == self.i {
            return false;
        }
        while j < self.s.len() && (self.s[j] == b' ' || self.s[j] == b'\t') {
            j += 1;
        }
        self.s.get(j) == Some(&b'=')
    }
}

/// Parse a `WWW-Authenticate` header into its challenges; what cannot be parsed is dropped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut lx = Lexer {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        while matches!(lx.peek(), Some(b' ' | b'\t' | b',')) {
            lx.i += 1;
        }
        let Some(scheme) = lx.token() else {
            break;
        };
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: BTreeMap::new(),
        };
        loop {
            lx.ws();
            if !lx.param_follows() {
                // A token68 (`Basic YWxh...`), or nothing: skip it; what follows is the next
                // challenge.
                while lx.peek().is_some_and(|c| !matches!(c, b',' | b' ' | b'\t')) {
                    lx.i += 1;
                }
                break;
            }
            let Some(name) = lx.token() else { break };
            lx.ws();
            lx.i += 1; // '='
            lx.ws();
            let value = if lx.peek() == Some(b'"') {
                lx.quoted()
            } else {
                lx.token()
            };
            let Some(value) = value else { break };
            ch.params.insert(name.to_ascii_lowercase(), value);
            lx.ws();
            if lx.peek() != Some(b',') {
                break;
            }
            lx.i += 1;
            lx.ws();
            if !lx.param_follows() {
                break;
            }
        }
        out.push(ch);
    }
    out
}

/// A bearer token from a token endpoint's JSON reply.
pub fn parse_token(body: &[u8]) -> Result<String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("bad token response: {e}")))?;
    ["token", "access_token"]
        .iter()
        .find_map(|k| v.get(k).and_then(Value::as_str).filter(|t| !t.is_empty()))
        .map(str::to_string)
        .ok_or_else(|| Error::invalid("token response has no token"))
}

// ---------------------------------------------------------------------------------------------
// Auth files

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The auth file `login` writes and that is read first: `--authfile`, `$REGISTRY_AUTH_FILE`,
/// `${XDG_RUNTIME_DIR}/containers/auth.json` or `/run/containers/UID/auth.json`.
pub fn primary_auth_file(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = env_path("REGISTRY_AUTH_FILE") {
        return p;
    }
    match env_path("XDG_RUNTIME_DIR") {
        Some(d) => d.join("containers/auth.json"),
        None => PathBuf::from(format!("/run/containers/{}/auth.json", sys::geteuid())),
    }
}

/// Every auth file read, in order (see the module doc). With `--authfile`, only that one.
pub fn auth_files(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = vec![primary_auth_file(explicit)];
    if explicit.is_some() {
        return out;
    }
    let home = env_path("HOME");
    if let Some(h) =
        env_path("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")))
    {
        out.push(h.join("containers/auth.json"));
    }
    match env_path("DOCKER_CONFIG") {
        Some(d) => out.push(d.join("config.json")),
        None => {
            if let Some(h) = home {
                out.push(h.join(".docker/config.json"));
            }
        }
    }
    out
}

/// An auth file key as `HOST[:PORT][/PATH]`.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let mut k = k.trim_end_matches('/');
    for suffix in ["/v1", "/v2"] {
        if let Some(s) = k.strip_suffix(suffix) {
            k = s;
        }
    }
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Credentials for `registry`/`repository` in one auth file's contents: the entry with the
/// longest key that is the registry or a path prefix of the repository within it.
pub fn lookup_in(file: &[u8], registry: &str, repository: &str) -> Result<Option<Credentials>> {
    let v: Value =
        serde_json::from_slice(file).map_err(|e| Error::invalid(format!("bad JSON: {e}")))?;
    let Some(auths) = v.get("auths").and_then(Value::as_object) else {
        return Ok(None);
    };
    let full = format!("{registry}/{repository}");
    let mut best: Option<(usize, &Value)> = None;
    for (key, entry) in auths {
        let k = normalize_key(key);
        let matches = k == registry
            || (full.starts_with(&k) && full.as_bytes().get(k.len()) == Some(&b'/'))
            || k == full;
        if matches && best.is_none_or(|(len, _)| k.len() > len) {
            best = Some((k.len(), entry));
        }
    }
    let Some((_, entry)) = best else {
        return Ok(None);
    };
    match entry
        .get("auth")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
    {
        Some(a) => Credentials::decode(a).map(Some),
        None => {
            log::debug!(
                "auth file entry for {registry} has no \"auth\" field (a credential helper?)"
            );
            Ok(None)
        }
    }
}

fn read_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Ok(None);
    };
    let dfd = match sys::open_dir_path(dir) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(None);
        }
        Err(e) => return Err(Error::io(format!("auth file {}", path.display()), e)),
    };
    match fsutil::read_small(
        std::os::fd::AsFd::as_fd(&dfd),
        sys::os_bytes(name),
        MAX_AUTH_FILE,
    ) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(Error::io(
            format!("reading auth file {}", path.display()),
            e,
        )),
    }
}

/// Credentials for a repository from the auth files (`explicit`: `--authfile`).
pub fn lookup(
    explicit: Option<&Path>,
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    for path in auth_files(explicit) {
        let Some(bytes) = read_file(&path)? else {
            continue;
        };
        match lookup_in(&bytes, registry, repository) {
            Ok(Some(c)) => {
                log::debug!("credentials for {registry} from {}", path.display());
                return Ok(Some(c));
            }
            Ok(None) => {}
            Err(e) => return Err(Error::invalid(format!("auth file {}: {e}", path.display()))),
        }
    }
    Ok(None)
}

fn write_file(path: &Path, v: &Value) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("bad auth file {}", path.display())))?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let dfd = sys::open_dir_path(dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    fsutil::write_atomic(
        std::os::fd::AsFd::as_fd(&dfd),
        sys::os_bytes(name),
        &bytes,
        0o600,
    )
    .map_err(|e| Error::io(format!("writing auth file {}", path.display()), e))
}

fn load_for_update(path: &Path) -> Result<Value> {
    let v = match read_file(path)? {
        Some(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::invalid(format!("auth file {}: bad JSON: {e}", path.display())))?,
        None => json!({}),
    };
    if !v.is_object() {
        return Err(Error::invalid(format!(
            "auth file {}: not a JSON object",
            path.display()
        )));
    }
    Ok(v)
}

/// Record credentials for `registry` in `path` (keeping every other entry and field).
pub fn store_login(path: &Path, registry: &str, creds: &Credentials) -> Result<()> {
    let mut v = load_for_update(path)?;
    let auths = v
        .as_object_mut()
        .and_then(|o| {
            o.entry("auths")
                .or_insert_with(|| json!({}))
                .as_object_mut()
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "auth file {}: \"auths\" is not an object",
                path.display()
            ))
        })?;
    auths.insert(registry.to_string(), json!({ "auth": creds.encode() }));
    write_file(path, &v)
}

/// Remove the entries for `registry` (every entry when `None`); returns how many went.
pub fn remove_login(path: &Path, registry: Option<&str>) -> Result<usize> {
    if read_file(path)?.is_none() {
        return Ok(0);
    }
    let mut v = load_for_update(path)?;
    let Some(auths) = v.get_mut("auths").and_then(Value::as_object_mut) else {
        return Ok(0);
    };
    let before = auths.len();
    match registry {
        Some(r) => auths.retain(|k, _| normalize_key(k) != r),
        None => auths.clear(),
    }
    let removed = before - auths.len();
    if removed > 0 {
        write_file(path, &v)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/busybox:pull"),
                ("service", "registry.docker.io"),
            ]
        );
        let c = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        // Spaces, token values, escapes, a scope with a comma inside quotes.
        let c = parse_challenges(
            r#"bearer  Realm = "http://h/t" , service=reg, scope="repository:a:pull,push" , error="x\"y""#,
        );
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].param("realm"), Some("http://h/t"));
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("scope"), Some("repository:a:pull,push"));
        assert_eq!(c[0].param("error"), Some("x\"y"));
        // Two challenges in one header.
        let c = parse_challenges(r#"Basic realm="a", Bearer realm="b",service="s""#);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(
            (c[0].scheme.as_str(), c[0].param("realm")),
            ("basic", Some("a"))
        );
        assert_eq!(
            (c[1].scheme.as_str(), c[1].param("service")),
            ("bearer", Some("s"))
        );
        // A scheme with no parameters, a token68, garbage: no panic.
        assert_eq!(parse_challenges("Negotiate")[0].scheme, "negotiate");
        assert_eq!(
            parse_challenges("Basic YWxhZGRpbjpvcGVuc2VzYW1l==")[0].scheme,
            "basic"
        );
        for junk in [
            "",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            ",,,",
            "Bearer ,=,",
            "Bearer realm=",
        ] {
            let _ = parse_challenges(junk);
        }
    }

    #[test]
    fn tokens() {
        assert_eq!(
            parse_token(br#"{"token":"abc","expires_in":60}"#).unwrap(),
            "abc"
        );
        assert_eq!(parse_token(br#"{"access_token":"xyz"}"#).unwrap(), "xyz");
        assert_eq!(
            parse_token(br#"{"token":"","access_token":"z"}"#).unwrap(),
            "z"
        );
        assert!(parse_token(br#"{"nothing":1}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn credentials() {
        let c = Credentials::parse("me:pa:ss").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("me", "pa:ss"));
        assert!(Credentials::parse(":x").is_err());
        assert!(Credentials::parse("nocolon").is_err());
        assert_eq!(Credentials::decode(&c.encode()).unwrap(), c);
        assert_eq!(c.encode(), "bWU6cGE6c3M=");
        assert!(Credentials::decode("%%%").is_err());
        assert!(!format!("{c:?}").contains("pa:ss"));
    }

    #[test]
    fn auth_file_lookup() {
        let user = |u: &str| STANDARD.encode(format!("{u}:pw"));
        let file = json!({
            "auths": {
                "localhost:5000": {"auth": user("host")},
                "localhost:5000/team": {"auth": user("team")},
                "localhost:5000/team/app": {"auth": user("app")},
                "https://index.docker.io/v1/": {"auth": user("hub")},
                "http://quay.io/": {"auth": user("quay")},
                "helper.example.com": {},
            },
            "credHelpers": {"x": "y"},
        })
        .to_string();
        let who = |reg: &str, repo: &str| {
            lookup_in(file.as_bytes(), reg, repo)
                .unwrap()
                .map(|c| c.username)
        };
        assert_eq!(who("localhost:5000", "other").as_deref(), Some("host"));
        assert_eq!(who("localhost:5000", "team/x").as_deref(), Some("team"));
        assert_eq!(who("localhost:5000", "team/app").as_deref(), Some("app"));
        assert_eq!(who("localhost:5000", "team/app2").as_deref(), Some("team"));
        assert_eq!(who("localhost:5000", "teamx").as_deref(), Some("host"));
        assert_eq!(who("docker.io", "library/busybox").as_deref(), Some("hub"));
        assert_eq!(who("quay.io", "a/b").as_deref(), Some("quay"));
        assert_eq!(who("localhost:5001", "a"), None);
        assert_eq!(who("helper.example.com", "a"), None);
        assert_eq!(lookup_in(b"{}", "a", "b").unwrap(), None);
        assert!(lookup_in(b"[", "a", "b").is_err());
        assert!(lookup_in(br#"{"auths":{"a":{"auth":"!!"}}}"#, "a", "b").is_err());
    }

    #[test]
    fn login_and_logout_keep_other_entries() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sub/auth.json");
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        std::fs::write(
            &path,
            r#"{"auths":{"other:1":{"auth":"b3RoZXI6cHc="}},"credHelpers":{"h":"x"}}"#,
        )
        .unwrap();
        let c = Credentials::parse("me:secret").unwrap();
        store_login(&path, "localhost:5000", &c).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(lookup_in(&bytes, "localhost:5000", "r").unwrap(), Some(c));
        assert!(lookup_in(&bytes, "other:1", "r").unwrap().is_some());
        assert!(String::from_utf8_lossy(&bytes).contains("credHelpers"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(remove_login(&path, Some("localhost:5000")).unwrap(), 1);
        assert_eq!(remove_login(&path, Some("localhost:5000")).unwrap(), 0);
        let bytes = std::fs::read(&path).unwrap();
        assert!(lookup_in(&bytes, "other:1", "r").unwrap().is_some());
        assert_eq!(remove_login(&path, None).unwrap(), 1);
        // A fresh file in a fresh directory.
        let p2 = d.path().join("new/dir/auth.json");
        store_login(&p2, "h:1", &Credentials::parse("a:b").unwrap()).unwrap();
        assert!(
            lookup_in(&std::fs::read(&p2).unwrap(), "h:1", "x")
                .unwrap()
                .is_some()
        );
    }
}
