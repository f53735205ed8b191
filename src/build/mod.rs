//! `layerfs build`: turning a Containerfile and a build context into an image.
//!
//! - `ignore`: `.dockerignore`/`.containerignore` rules, matched exactly as Docker does;
//! - `context`: the build context read through directory fds (COPY/ADD source selection,
//!   walks, content digests for the build cache, and why a cache key changed).

pub mod context;
pub mod ignore;
