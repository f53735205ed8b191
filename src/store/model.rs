//! OCI image-spec JSON documents as the store reads and writes them. Unknown fields are kept
//! (`extra`), so rewriting `index.json` never drops what another tool put there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Annotation naming an image in an index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            annotations: None,
            platform: None,
            extra: BTreeMap::new(),
        }
    }

    /// The parsed digest (sha256 only).
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }

    /// The `org.opencontainers.image.ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

/// `index.json` (and image indexes in general).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            schema_version: 2,
            media_type: Some(MT_INDEX.to_string()),
            manifests: Vec::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// An image manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Parse JSON with a one-line error naming the document.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("bad {what}: {e}")))
}

/// Serialize JSON compactly (what gets hashed into a digest).
pub fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain data structures to a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The `rootfs.diff_ids` of an image config.
pub fn config_diff_ids(config: &serde_json::Value) -> Result<Vec<Digest>> {
    let ids = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::invalid("image config has no rootfs.diff_ids"))?;
    ids.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::invalid("bad diff_id in image config"))
                .and_then(Digest::parse)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive() {
        let src = br#"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":1,"annotations":{"org.opencontainers.image.ref.name":"x"},"urls":["u"]}],"annotations":{"a":"b"}}"#;
        let idx: Index = parse(src, "index").unwrap();
        assert_eq!(idx.manifests[0].ref_name(), Some("x"));
        let back = String::from_utf8(to_bytes(&idx)).unwrap();
        assert!(back.contains(r#""urls":["u"]"#), "{back}");
        assert!(back.contains(r#""annotations":{"a":"b"}"#), "{back}");
    }

    #[test]
    fn diff_ids() {
        let c = serde_json::json!({"rootfs":{"type":"layers","diff_ids":[
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}});
        assert_eq!(config_diff_ids(&c).unwrap().len(), 1);
        assert!(config_diff_ids(&serde_json::json!({})).is_err());
    }
}
