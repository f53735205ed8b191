//! The OCI distribution client: `layerfs pull` and `layerfs push`.
//!
//! - `reference`: `[docker://]HOST[:PORT]/REPO[:TAG][@DIGEST]`, validated;
//! - `auth`: credentials (auth files, `--creds`) and `WWW-Authenticate` challenges;
//! - `client`: HTTP with rustls, auth, retries;
//! - `state`: what the store remembers for registries (`registry/` in the store);
//! - `pull`, `push`: the two transfers.
//!
//! Guarantees: every byte a registry sends is checked against its digest and size before it
//! is used (a manifest before it is parsed further, a blob before it is extracted); a pull
//! that fails leaves the store's images, blobs and layers as they were (only a partial
//! download may stay, to be resumed); a push sends the stored manifest's exact bytes, so the
//! registry's digest is the store's.

pub mod auth;
pub mod client;
pub mod reference;

pub use client::{Client, Options};
pub use reference::Reference;
pub mod pull;
pub mod push;
pub mod state;

use crate::error::{Error, Result};

/// Progress of blob transfers: library code reports, the CLI draws bars.
pub trait Progress: Sync {
    /// A transfer of `size` bytes of `label` starts, `done` of them already there (resumed).
    fn start(&self, label: &str, size: u64, done: u64) -> Box<dyn Bar>;
}

/// One transfer's progress.
pub trait Bar: Send {
    fn inc(&self, n: u64);
    /// Back to `done` bytes (a transfer restarted).
    fn set(&self, done: u64);
    /// What is happening now (the bytes are all there: "extracting").
    fn note(&self, note: &str);
    /// The transfer ended; `note` says how ("done", "exists", "mounted from x").
    fn finish(&self, note: &str);
}

/// No progress shown.
pub struct NoProgress;

struct NoBar;

impl Bar for NoBar {
    fn inc(&self, _: u64) {}
    fn set(&self, _: u64) {}
    fn note(&self, _: &str) {}
    fn finish(&self, _: &str) {}
}

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64, _: u64) -> Box<dyn Bar> {
        Box::new(NoBar)
    }
}

/// An image platform: `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This host's platform (`linux/amd64` on x86-64).
    pub fn host() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: crate::store::images::host_arch().into(),
            variant: None,
        }
    }

    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = (2..=3).contains(&parts.len())
            && parts.iter().all(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !ok {
            return Err(Error::invalid(format!(
                "bad platform {s:?}: want OS/ARCH[/VARIANT], e.g. linux/arm64"
            )));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// Whether an index entry's `platform` object is this platform. Without a variant any
    /// variant matches; `arm64` without a variant is `v8`.
    pub fn matches(&self, p: &serde_json::Value) -> bool {
        let field = |k: &str| p.get(k).and_then(|v| v.as_str());
        if field("os") != Some(self.os.as_str())
            || field("architecture") != Some(self.architecture.as_str())
        {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let norm = |v: Option<&str>| match (self.architecture.as_str(), v) {
            ("arm64", None) => Some("v8".to_string()),
            (_, v) => v.map(str::to_string),
        };
        norm(field("variant")) == norm(Some(want))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64").unwrap();
        assert!(p.matches(&json!({"os":"linux","architecture":"arm64","variant":"v8"})));
        assert!(!p.matches(&json!({"os":"linux","architecture":"amd64"})));
        let v8 = Platform::parse("linux/arm64/v8").unwrap();
        assert!(v8.matches(&json!({"os":"linux","architecture":"arm64"})));
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(!v7.matches(&json!({"os":"linux","architecture":"arm","variant":"v6"})));
        assert_eq!(v7.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "a/b/c/d", "linux/amd 64", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Platform::host()
                .matches(&json!({"os":"linux","architecture":crate::store::images::host_arch()}))
        );
    }
}
