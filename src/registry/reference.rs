//! Image references for registries: `[docker://]HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]`,
//! validated with the distribution spec's grammar (`distribution/reference`):
//!
//! ```text
//! domain     := host [":" port]         host: DNS labels, an IPv4 address or "[IPv6]"
//! repository := component ("/" component)*, at most 255 characters
//! component  := [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
//! tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest     := sha256:<64 lowercase hex>  (the only algorithm the store uses)
//! ```
//!
//! The registry host is required: layerfs never guesses a registry for a short name (that
//! guess is how a typo pulls someone else's image). `docker.io` is accepted and talks to
//! `registry-1.docker.io`, with `library/` added to one-component repositories.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// A parsed registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `HOST[:PORT]` as written (the key of auth files and `certs.d` directories).
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

const MAX_REPOSITORY: usize = 255;
const MAX_TAG: usize = 128;

fn bad(input: &str, why: &str) -> Error {
    Error::invalid(format!("bad registry reference {input:?}: {why}"))
}

impl Reference {
    /// Parse a reference; `docker://` in front is accepted and dropped.
    pub fn parse(input: &str) -> Result<Reference> {
        let s = input.strip_prefix("docker://").unwrap_or(input);
        if s.contains("://") {
            return Err(bad(input, "only docker:// references name a registry"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (
                n,
                Some(Digest::parse(d).map_err(|e| bad(input, &e.to_string()))?),
            ),
            None => (s, None),
        };
        let (domain, rest) = name_tag
            .split_once('/')
            .ok_or_else(|| bad(input, "give the registry: HOST[:PORT]/REPOSITORY[:TAG]"))?;
        if !looks_like_domain(domain) {
            return Err(bad(
                input,
                &format!(
                    "{domain:?} is not a registry host (HOST[:PORT]/REPOSITORY; \
                     docker.io/library/NAME for Docker Hub)"
                ),
            ));
        }
        validate_domain(domain).map_err(|why| bad(input, &why))?;
        // A tag follows the last ':' after the last '/'.
        let (repo, tag) = match rest.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|why| bad(input, &why))?;
        }
        let mut repository = repo.to_string();
        if domain == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        validate_repository(&repository).map_err(|why| bad(input, &why))?;
        Ok(Reference {
            registry: domain.to_string(),
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// `scheme://host[:port]` of the registry's API.
    pub fn api_base(&self, plain_http: bool) -> String {
        let host = match self.registry.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            h => h,
        };
        format!("{}://{host}", if plain_http { "http" } else { "https" })
    }

    /// What a manifest is fetched or pushed by: the digest, else the tag, else `latest`.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// `HOST/REPO`, the key sources and auth files use for one repository.
    pub fn repo_key(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The store name a pull uses without `--name`: `HOST/REPO:TAG` (`latest` when none);
    /// none for a reference by digest alone.
    pub fn default_name(&self) -> Option<String> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(format!("{}:{t}", self.repo_key())),
            (None, Some(_)) => None,
            (None, None) => Some(format!("{}:latest", self.repo_key())),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repo_key())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The first component is a registry host when it has a dot, a port or is `localhost`
/// (the rule docker and containers/image use).
fn looks_like_domain(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost" || s.starts_with('[')
}

fn validate_domain(d: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {d:?}"))?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("bad IPv6 address {v6:?}"));
        }
        match after {
            "" => (None, None),
            p => (
                None,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("bad host {d:?}"))?,
                ),
            ),
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(h) = host {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                let b = label.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            });
        if !ok {
            return Err(format!("bad registry host {h:?}"));
        }
    }
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(format!("bad port {p:?}"));
        }
    }
    Ok(())
}

fn validate_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn validate_repository(r: &str) -> Result<(), String> {
    if r.is_empty() {
        return Err("empty repository".into());
    }
    if r.len() > MAX_REPOSITORY {
        return Err(format!(
            "repository longer than {MAX_REPOSITORY} characters"
        ));
    }
    match r.split('/').find(|c| !validate_component(c)) {
        Some(c) => Err(format!(
            "bad repository component {c:?}: lowercase letters and digits, separated by \
             '.', '_', '__' or dashes"
        )),
        None => Ok(()),
    }
}

/// Whether `r` is a valid repository path (what a cross-repository mount may name).
pub fn valid_repository(r: &str) -> bool {
    validate_repository(r).is_ok()
}

fn validate_tag(t: &str) -> Result<(), String> {
    let b = t.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad tag {t:?}: up to {MAX_TAG} of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn good_references() {
        // input, registry, repository, tag, digest?, display
        type Row<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, bool, &'a str);
        let table: &[Row] = &[
            (
                "localhost:5000/a",
                "localhost:5000",
                "a",
                None,
                false,
                "localhost:5000/a",
            ),
            (
                "docker://localhost:5000/a/b:v1",
                "localhost:5000",
                "a/b",
                Some("v1"),
                false,
                "localhost:5000/a/b:v1",
            ),
            (
                "localhost/x:1.0-rc_1",
                "localhost",
                "x",
                Some("1.0-rc_1"),
                false,
                "localhost/x:1.0-rc_1",
            ),
            (
                "quay.io/a.b/c__d/e-f---g:T",
                "quay.io",
                "a.b/c__d/e-f---g",
                Some("T"),
                false,
                "quay.io/a.b/c__d/e-f---g:T",
            ),
            (
                "127.0.0.1:5000/r@D",
                "127.0.0.1:5000",
                "r",
                None,
                true,
                "127.0.0.1:5000/r@D",
            ),
            (
                "[::1]:5000/r:t@D",
                "[::1]:5000",
                "r",
                Some("t"),
                true,
                "[::1]:5000/r:t@D",
            ),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                None,
                false,
                "docker.io/library/busybox",
            ),
            (
                "docker.io/me/app:1",
                "docker.io",
                "me/app",
                Some("1"),
                false,
                "docker.io/me/app:1",
            ),
            (
                "my-reg.example.com:443/x",
                "my-reg.example.com:443",
                "x",
                None,
                false,
                "my-reg.example.com:443/x",
            ),
        ];
        for (input, reg, repo, tag, digest, shown) in table {
            let input = input.replace('D', D);
            let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, *reg, "{input}");
            assert_eq!(r.repository, *repo, "{input}");
            assert_eq!(r.tag.as_deref(), *tag, "{input}");
            assert_eq!(r.digest.is_some(), *digest, "{input}");
            assert_eq!(r.to_string(), shown.replace('D', D), "{input}");
        }
    }

    #[test]
    fn bad_references() {
        let long_repo = format!("localhost/{}", "a".repeat(256));
        let long_tag = format!("localhost/a:{}", "t".repeat(129));
        let table: &[(&str, &str)] = &[
            ("busybox", "give the registry"),
            ("library/busybox", "not a registry host"),
            ("localhost:5000/", "empty repository"),
            ("localhost:5000/A", "bad repository component"),
            ("localhost:5000/a//b", "bad repository component"),
            ("localhost:5000/a/", "bad repository component"),
            ("localhost:5000/-a", "bad repository component"),
            ("localhost:5000/a..b", "bad repository component"),
            ("localhost:5000/a___b", "bad repository component"),
            ("localhost:5000/a:", "bad tag"),
            ("localhost:5000/a:.x", "bad tag"),
            ("localhost:5000/a:x y", "bad tag"),
            ("localhost:99999/a", "bad port"),
            ("localhost:/a", "bad port"),
            ("exa_mple.com/a", "bad registry host"),
            ("-x.com/a", "bad registry host"),
            ("[::g]:5000/a", "bad IPv6"),
            ("localhost/a@sha256:123", "malformed digest"),
            ("localhost/a@md5:00", "unsupported digest"),
            ("oci:/tmp/x", "bad port"),
            ("https://localhost/a", "only docker://"),
            (&long_repo, "longer than 255"),
            (&long_tag, "bad tag"),
        ];
        for (input, want) in table {
            let e = Reference::parse(input).expect_err(input).to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn urls_and_names() {
        let r = Reference::parse("localhost:5000/a/b").unwrap();
        assert_eq!(r.api_base(true), "http://localhost:5000");
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(
            r.default_name().as_deref(),
            Some("localhost:5000/a/b:latest")
        );
        let r = Reference::parse(&format!("localhost:5000/a@{D}")).unwrap();
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.default_name(), None);
        let r = Reference::parse("docker.io/busybox:1").unwrap();
        assert_eq!(r.api_base(false), "https://registry-1.docker.io");
        crate::store::validate_name(&r.default_name().unwrap()).unwrap();
    }
}
