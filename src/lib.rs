//! layerfs: a FUSE union filesystem for container layers that can also turn a container's
//! changes into an OCI layer and commit it.
//!
//! Dependencies flow one way: `cli` -> {`fuse` (-> `prefetch`, `workers`, `busypoll`,
//! `heap`), `daemon`, `store`, `fsck`} -> `oci` -> `union` -> `sys` (`digest` and `fsutil` are
//! leaf helpers over `sys`). Only `sys` contains `unsafe`.

pub mod busypoll;
pub mod cli;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod fsck;
pub mod fsutil;
pub mod fuse;
pub mod heap;
pub mod oci;
pub mod prefetch;
pub mod store;
pub mod sys;
pub mod union;
pub mod uring;
pub mod workers;
