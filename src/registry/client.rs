//! The HTTP side of the distribution API: one [`Client`] per repository, on `ureq` with
//! rustls.
//!
//! * TLS: the system's roots (`rustls-native-certs`: `/etc/ssl/certs`, `SSL_CERT_FILE`,
//!   `SSL_CERT_DIR`; the webpki roots only when the system has none), plus every `*.crt` of
//!   the cert directory (`--cert-dir`, else `/etc/containers/certs.d/HOST[:PORT]` or
//!   `/etc/docker/certs.d/HOST[:PORT]` when present), and a client certificate from a
//!   `NAME.cert` + `NAME.key` pair there, as podman reads them. `--tls-verify=false` talks
//!   plain HTTP to the registry and verifies no certificate (of a token server, say).
//! * Auth: anonymous until the registry answers 401; then Basic with the credentials, or a
//!   Bearer token fetched from the challenge's realm for this repository's scope (with the
//!   credentials, if any), cached per scope and fetched again once when refused.
//! * Retries: connection errors, 429 and 5xx are retried with exponential backoff (0.2 s
//!   doubling, at most 5 s apart; `Retry-After` honoured up to 30 s), up to 6 times
//!   (`LAYERFS_REGISTRY_RETRIES`). Requests inside an upload session are not retried one by
//!   one: the push retries the blob.
//! * Nothing read from a response is trusted for size: bodies are read with limits.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::{Request, Response};
use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig};
use ureq::{Agent, Body};

use super::auth::{self, Challenge, Credentials};
use super::reference::Reference;
use crate::error::{Error, Result};

/// Largest error or token response read.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// Default number of retries of a request that failed transiently.
const DEFAULT_RETRIES: u32 = 6;

/// How to reach a registry.
#[derive(Clone, Debug)]
pub struct Options {
    /// Verify TLS certificates; false: plain HTTP.
    pub tls_verify: bool,
    pub cert_dir: Option<PathBuf>,
    /// `--creds`; else the auth files.
    pub creds: Option<Credentials>,
    pub authfile: Option<PathBuf>,
    /// Retries of a request that failed transiently [default: `LAYERFS_REGISTRY_RETRIES`,
    /// else 6]; the build cache asks its sources for fewer.
    pub retries: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls_verify: true,
            cert_dir: None,
            creds: None,
            authfile: None,
            retries: None,
        }
    }
}

/// One HTTP request.
pub struct Req<'a> {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: &'a [u8],
    /// Token scopes needed besides this repository's (a mount's source repository).
    pub scopes: Vec<String>,
    /// Retry transient failures of this request.
    pub retry: bool,
}

impl<'a> Req<'a> {
    pub fn new(method: &'static str, url: String) -> Req<'a> {
        Req {
            method,
            url,
            headers: Vec::new(),
            body: &[],
            scopes: Vec::new(),
            retry: true,
        }
    }
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self
    }
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    /// Bearer tokens by scope list.
    tokens: HashMap<String, String>,
}

/// A client for one repository of one registry.
pub struct Client {
    agent: Agent,
    base: String,
    pub reference: Reference,
    creds: Option<Credentials>,
    tls_verify: bool,
    /// `pull` or `pull,push`.
    actions: &'static str,
    auth: Mutex<AuthState>,
    /// Held while a token is fetched, so concurrent requests wait for one fetch.
    token_fetch: Mutex<()>,
    retries: u32,
}

/// A transport failure worth retrying: the connection broke, not the conversation. TLS
/// failures arrive as `Io` errors of kind `InvalidData` and are not retried.
fn transient(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => transient_io(io),
        ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_)
        | ureq::Error::BodyStalled => true,
        _ => false,
    }
}

/// An I/O error of a broken or refused connection (worth retrying).
pub fn transient_io(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
    )
}

/// A status worth retrying.
pub fn transient_status(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// Sleep before retry `attempt` (0-based).
pub fn backoff(attempt: u32, retry_after: Option<u64>) -> Duration {
    let exp = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(10)));
    let d = exp.min(Duration::from_secs(5));
    match retry_after {
        Some(s) => Duration::from_secs(s.min(30)).max(d),
        None => d,
    }
}

pub fn retries_from_env() -> u32 {
    std::env::var("LAYERFS_REGISTRY_RETRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RETRIES)
}

/// A header of a response, when it is text.
pub fn header<'r>(resp: &'r Response<Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The error a registry sent, as a short text: `CODE: message` of its first error.
pub fn error_text(resp: &mut Response<Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_SMALL_BODY)
        .read_to_vec()
        .unwrap_or_default();
    let v: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let first = v
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(|e| e.get(0));
    match first {
        Some(e) => {
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
            format!("{code}: {msg}").chars().take(300).collect()
        }
        None => String::new(),
    }
}

/// An error for an unexpected status.
pub fn status_error(what: &str, resp: &mut Response<Body>) -> Error {
    let status = resp.status().as_u16();
    let text = error_text(resp);
    let hint = match status {
        401 => " (authentication required: layerfs login, or --creds)",
        403 => " (access denied)",
        _ => "",
    };
    if text.is_empty() {
        Error::invalid(format!("{what}: registry answered {status}{hint}"))
    } else {
        Error::invalid(format!("{what}: registry answered {status} {text}{hint}"))
    }
}

fn net_error(what: &str, e: ureq::Error, plain_http: bool) -> Error {
    let tls = match &e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
        ureq::Error::Io(io) => !transient_io(io),
        _ => false,
    };
    let hint = if tls && !plain_http {
        " (TLS failed: a private CA needs --cert-dir DIR; a plain-HTTP registry needs \
         --tls-verify=false)"
    } else {
        ""
    };
    Error::io(
        format!("{what}{hint}"),
        std::io::Error::other(e.to_string()),
    )
}

/// Certificates in a cert directory: CAs (`*.crt`) and a client certificate
/// (`NAME.cert` + `NAME.key`).
fn read_cert_dir(dir: &Path, roots: &mut Vec<Certificate<'static>>) -> Result<Option<ClientCert>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cert dir {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut client = None;
    for p in &names {
        let ext = p.extension().and_then(|e| e.to_str());
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        match ext {
            Some("crt") => {
                let pem = read(p)?;
                let mut n = 0;
                for item in ureq::tls::parse_pem(&pem) {
                    if let Ok(PemItem::Certificate(c)) = item {
                        roots.push(c);
                        n += 1;
                    }
                }
                if n == 0 {
                    return Err(Error::invalid(format!(
                        "{}: no PEM certificate in it",
                        p.display()
                    )));
                }
                log::debug!("{n} CA certificate(s) from {}", p.display());
            }
            Some("cert") => {
                let key_path = p.with_extension("key");
                let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&read(p)?)
                    .filter_map(|i| match i {
                        Ok(PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                let key = ureq::tls::PrivateKey::from_pem(&read(&key_path)?)
                    .map_err(|e| Error::invalid(format!("{}: {e}", key_path.display())))?;
                client = Some(ClientCert::new_with_certs(&certs, key));
            }
            _ => {}
        }
    }
    Ok(client)
}

fn tls_config(registry: &str, opts: &Options) -> Result<TlsConfig> {
    if !opts.tls_verify {
        return Ok(TlsConfig::builder().disable_verification(true).build());
    }
    let native = rustls_native_certs::load_native_certs();
    let mut roots: Vec<Certificate<'static>> = native
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let system_roots = roots.len();
    let dirs: Vec<PathBuf> = match &opts.cert_dir {
        Some(d) => vec![d.clone()],
        None => ["/etc/containers/certs.d", "/etc/docker/certs.d"]
            .iter()
            .map(|b| Path::new(b).join(registry))
            .filter(|p| p.is_dir())
            .collect(),
    };
    let mut client = None;
    for d in &dirs {
        if let Some(c) = read_cert_dir(d, &mut roots)? {
            client = Some(c);
        }
    }
    let root_certs = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        if system_roots == 0 && dirs.is_empty() {
            log::debug!("no system CA certificates");
        }
        RootCerts::from(roots)
    };
    Ok(TlsConfig::builder()
        .root_certs(root_certs)
        .client_cert(client)
        .build())
}

fn make_agent(registry: &str, opts: &Options) -> Result<Agent> {
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls_config(registry, opts)?)
        .user_agent(format!("layerfs/{}", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .timeout_per_write(Some(Duration::from_secs(120)))
        .max_redirects(5)
        .max_idle_connections_per_host(8)
        .build();
    Ok(config.new_agent())
}

/// Whether `url` is on the registry `base` (`scheme://host[:port]`): nothing after the port
/// but a path.
pub fn same_origin(base: &str, url: &str) -> bool {
    url.strip_prefix(base)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// `url` plus a query parameter, whether or not it has a query already.
pub fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

impl Client {
    /// A client for `reference`'s repository, for pulling (`push` false) or pushing; checks
    /// that the registry answers (`GET /v2/`) and learns how it wants to be authenticated.
    pub fn new(reference: &Reference, opts: &Options, push: bool) -> Result<Client> {
        let creds = match &opts.creds {
            Some(c) => Some(c.clone()),
            None => auth::lookup(
                opts.authfile.as_deref(),
                &reference.registry,
                &reference.repository,
            )?,
        };
        let client = Client {
            agent: make_agent(&reference.registry, opts)?,
            base: reference.api_base(!opts.tls_verify),
            reference: reference.clone(),
            creds,
            tls_verify: opts.tls_verify,
            actions: if push { "pull,push" } else { "pull" },
            auth: Mutex::new(AuthState::default()),
            token_fetch: Mutex::new(()),
            retries: opts.retries.unwrap_or_else(retries_from_env),
        };
        client.ping()?;
        Ok(client)
    }

    /// Check credentials the way `docker login` does: `GET /v2/` with them (Basic), or a
    /// token without a scope (Bearer). A registry that asks for nothing accepts anything.
    pub fn check_login(&self) -> Result<()> {
        let challenge = {
            let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
            st.challenge.clone()
        };
        match challenge {
            None => {
                log::info!("{} asks for no credentials", self.reference.registry);
                Ok(())
            }
            Some(c) if c.scheme == "bearer" => self.fetch_token(&c, &[]).map(drop),
            Some(_) => {
                let url = format!("{}/v2/", self.base);
                let mut req = Req::new("GET", url);
                if let Some(c) = &self.creds {
                    req = req.header("authorization", format!("Basic {}", c.encode()));
                }
                let mut resp = self.retrying(&req, None)?;
                match resp.status().as_u16() {
                    200 => Ok(()),
                    401 => Err(Error::invalid(format!(
                        "{}: the registry refused the credentials",
                        self.reference.registry
                    ))),
                    _ => Err(status_error("logging in", &mut resp)),
                }
            }
        }
    }

    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// `scheme://host/v2/<repo>/<rest>`.
    pub fn url(&self, rest: &str) -> String {
        format!("{}/v2/{}/{rest}", self.base, self.reference.repository)
    }

    /// An absolute URL for a `Location` header (absolute, or a path on the registry).
    pub fn location(&self, loc: &str) -> Result<String> {
        if loc.starts_with("https://") || (loc.starts_with("http://") && !self.tls_verify) {
            Ok(loc.to_string())
        } else if loc.starts_with('/') {
            Ok(format!("{}{loc}", self.base))
        } else {
            Err(Error::invalid(format!(
                "registry sent an unusable upload location {loc:?}"
            )))
        }
    }

    fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let mut resp = self.retrying(&Req::new("GET", url), None)?;
        match resp.status().as_u16() {
            200 => Ok(()),
            401 => {
                self.learn(&resp);
                Ok(())
            }
            404 => Err(Error::invalid(format!(
                "{}: not a registry (GET /v2/ answered 404)",
                self.reference.registry
            ))),
            _ => Err(status_error(
                &format!("registry {}", self.reference.registry),
                &mut resp,
            )),
        }
    }

    /// Remember the challenge of a 401 response; false when it had none we can answer.
    fn learn(&self, resp: &Response<Body>) -> bool {
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_challenges)
            .collect();
        let pick = challenges
            .iter()
            .find(|c| c.scheme == "bearer" && c.param("realm").is_some())
            .or_else(|| challenges.iter().find(|c| c.scheme == "basic"))
            .cloned();
        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        match pick {
            Some(c) => {
                log::debug!("registry challenge: {} {:?}", c.scheme, c.param("realm"));
                let same = st.challenge.as_ref().is_some_and(|old| {
                    old.scheme == c.scheme
                        && old.param("realm") == c.param("realm")
                        && old.param("service") == c.param("service")
                });
                if !same {
                    st.tokens.clear();
                }
                st.challenge = Some(c);
                true
            }
            None => false,
        }
    }

    fn scopes(&self, extra: &[String]) -> Vec<String> {
        let mut s = vec![format!(
            "repository:{}:{}",
            self.reference.repository, self.actions
        )];
        s.extend(extra.iter().cloned());
        s
    }

    /// The `Authorization` header for a request needing `scopes`, fetching a token if needed
    /// (one fetch at a time: threads asking for the same scope share it).
    fn authorization(&self, scopes: &[String]) -> Result<Option<String>> {
        if let Some(a) = self.cached_authorization(scopes) {
            return Ok(a);
        }
        let _fetching = self.token_fetch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = self.cached_authorization(scopes) {
            return Ok(a);
        }
        let challenge = {
            let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
            match &st.challenge {
                Some(c) => c.clone(),
                None => return Ok(None),
            }
        };
        let token = self.fetch_token(&challenge, scopes)?;
        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.tokens.insert(scopes.join(" "), token.clone());
        Ok(Some(format!("Bearer {token}")))
    }

    /// What [`Self::authorization`] answers without fetching; `None` when a token is needed.
    fn cached_authorization(&self, scopes: &[String]) -> Option<Option<String>> {
        let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        match &st.challenge {
            None => Some(None),
            Some(c) if c.scheme == "basic" => {
                Some(self.creds.as_ref().map(|c| format!("Basic {}", c.encode())))
            }
            Some(_) => st
                .tokens
                .get(&scopes.join(" "))
                .map(|t| Some(format!("Bearer {t}"))),
        }
    }

    /// Forget the token used for `scopes` when it is `used` (refused: expired, say).
    fn drop_token(&self, scopes: &[String], used: Option<&str>) {
        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let key = scopes.join(" ");
        if st
            .tokens
            .get(&key)
            .is_some_and(|t| used == Some(format!("Bearer {t}").as_str()))
        {
            st.tokens.remove(&key);
        }
    }

    fn fetch_token(&self, ch: &Challenge, scopes: &[String]) -> Result<String> {
        let realm = ch.param("realm").unwrap_or_default();
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(Error::invalid(format!(
                "registry's token realm {realm:?} is not an http(s) URL"
            )));
        }
        if realm.starts_with("http://") && self.tls_verify && self.creds.is_some() {
            return Err(Error::invalid(format!(
                "refusing to send credentials to the plain-HTTP token server {realm} \
                 (--tls-verify=false allows it)"
            )));
        }
        let mut url = realm.to_string();
        let enc = |s: &str| {
            let mut out = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        };
        if let Some(s) = ch.param("service") {
            url = with_query(&url, &format!("service={}", enc(s)));
        }
        for s in scopes {
            url = with_query(&url, &format!("scope={}", enc(s)));
        }
        let mut req = Req::new("GET", url);
        if let Some(c) = &self.creds {
            req = req.header("authorization", format!("Basic {}", c.encode()));
        }
        let mut resp = self.retrying(&req, None)?;
        match resp.status().as_u16() {
            200 => {}
            401 => {
                return Err(Error::invalid(format!(
                    "{}: the token server refused the credentials",
                    self.reference.registry
                )));
            }
            _ => return Err(status_error("getting a registry token", &mut resp)),
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_SMALL_BODY)
            .read_to_vec()
            .map_err(|e| net_error("reading a registry token", e, !self.tls_verify))?;
        auth::parse_token(&body)
    }

    /// Send once (no auth, no retry).
    fn raw(
        &self,
        req: &Req<'_>,
        authz: Option<&str>,
    ) -> std::result::Result<Response<Body>, ureq::Error> {
        let mut b = Request::builder().method(req.method).uri(&req.url);
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        if let Some(a) = authz {
            b = b.header("authorization", a);
        }
        let request = b.body(req.body).map_err(ureq::Error::Http)?;
        log::debug!("{} {}", req.method, req.url);
        self.agent
            .run(request)
            .inspect(|r| log::debug!("{} {}: {}", req.method, req.url, r.status()))
    }

    /// Send with retries of transient failures (when the request allows them).
    fn retrying(&self, req: &Req<'_>, authz: Option<&str>) -> Result<Response<Body>> {
        let mut attempt = 0;
        loop {
            let r = self.raw(req, authz);
            let (retry, retry_after) = match &r {
                Err(e) => (transient(e), None),
                Ok(resp) => (
                    transient_status(resp.status().as_u16()),
                    header(resp, "retry-after").and_then(|v| v.trim().parse::<u64>().ok()),
                ),
            };
            if !retry || !req.retry || attempt >= self.retries {
                let what = format!("{} {}", req.method, req.url);
                return r.map_err(|e| net_error(&what, e, !self.tls_verify));
            }
            let wait = backoff(attempt, retry_after);
            match &r {
                Ok(resp) => log::info!(
                    "{} {}: {}; retrying in {wait:?}",
                    req.method,
                    req.url,
                    resp.status()
                ),
                Err(e) => log::info!("{} {}: {e}; retrying in {wait:?}", req.method, req.url),
            }
            std::thread::sleep(wait);
            attempt += 1;
        }
    }

    /// Send a request to the registry: authenticated as it asks, retried when it fails
    /// transiently. A 401 is answered once: with the new challenge's scheme, or a fresh token
    /// (the cached one may have expired).
    pub fn send(&self, req: &Req<'_>) -> Result<Response<Body>> {
        // Credentials and tokens go to the registry only, never to another host an upload
        // Location names.
        if !same_origin(&self.base, &req.url) {
            log::debug!(
                "{} {}: another host, sent without credentials",
                req.method,
                req.url
            );
            return self.retrying(req, None);
        }
        let scopes = self.scopes(&req.scopes);
        let mut answered = false;
        loop {
            let authz = self.authorization(&scopes)?;
            let resp = self.retrying(req, authz.as_deref())?;
            if resp.status().as_u16() != 401 || answered || !self.learn(&resp) {
                return Ok(resp);
            }
            answered = true;
            self.drop_token(&scopes, authz.as_deref());
            let basic = {
                let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
                st.challenge.as_ref().is_some_and(|c| c.scheme == "basic")
            };
            // Basic: nothing to answer with, or the same credentials again.
            if basic && (self.creds.is_none() || authz.is_some()) {
                return Ok(resp);
            }
        }
    }

    /// Read a whole small body (manifests, configs) with a limit.
    pub fn read_limited(
        &self,
        what: &str,
        resp: &mut Response<Body>,
        limit: u64,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut reader = resp.body_mut().as_reader().take(limit + 1);
        reader
            .read_to_end(&mut out)
            .map_err(|e| Error::io(format!("reading {what}"), e))?;
        if out.len() as u64 > limit {
            return Err(Error::invalid(format!(
                "{what}: the registry sent more than {limit} bytes"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0, None), Duration::from_millis(200));
        assert_eq!(backoff(3, None), Duration::from_millis(1600));
        assert_eq!(backoff(30, None), Duration::from_secs(5));
        assert_eq!(backoff(0, Some(3)), Duration::from_secs(3));
        assert_eq!(backoff(0, Some(9999)), Duration::from_secs(30));
        assert!(transient_status(503) && transient_status(429) && !transient_status(404));
    }

    #[test]
    fn credentials_stay_on_the_registry() {
        let base = "https://reg.example:5000";
        assert!(same_origin(
            base,
            "https://reg.example:5000/v2/a/blobs/uploads/x?y"
        ));
        for other in [
            "https://reg.example:5000.evil.com/v2/",
            "https://reg.example:5000@evil.com/v2/",
            "https://reg.example:50001/v2/",
            "http://reg.example:5000/v2/",
            "https://evil.com/https://reg.example:5000/",
            "https://reg.example:5000",
        ] {
            assert!(!same_origin(base, other), "{other}");
        }
    }

    #[test]
    fn queries() {
        assert_eq!(with_query("http://h/u", "a=b"), "http://h/u?a=b");
        assert_eq!(with_query("http://h/u?x=1", "a=b"), "http://h/u?x=1&a=b");
    }

    #[test]
    fn cert_dir_needs_pem() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ca.crt"), "not a certificate").unwrap();
        let mut roots = Vec::new();
        let e = read_cert_dir(d.path(), &mut roots).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(read_cert_dir(&d.path().join("missing"), &mut roots).is_err());
    }
}
