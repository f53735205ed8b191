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
