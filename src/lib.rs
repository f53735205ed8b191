//! layerfs: a FUSE union filesystem for container layers that can also turn a container's
//! changes into an OCI layer and commit it.
//!
//! The map, one job per folder:
//!
//! - `cli/`: the command line, one file per family of commands;
//! - `build/`: `layerfs build` (Containerfile parsing, the build context and its ignore rules,
//!   cache keys and entries, running the steps);
//! - `run/`: running a command in a rootfs through an OCI runtime (runc/crun), for build and
//!   run;
//! - `mount/`: serving a mount (daemon, FUSE adapter, transports, worker threads);
//! - `union/`: the union view without FUSE (layer stack, lookup, copy-up, whiteouts, rename,
//!   origins, redirects, metacopy files);
//! - `oci/`: layer tars (safe import, canonical export, whiteout conversion, compression); the
//!   export reads directories renamed with redirects through a read-only `union::Union`;
//! - `store/`: the OCI image layout store (blobs, index, layers, containers, leases, gc, a
//!   build step's upper adopted as its layer);
//! - `fsck`: checks of uppers and of the store; `digest`, `fsutil`: leaf helpers;
//! - `sys`: the only module with `unsafe` and raw system calls.
//!
//! Dependencies flow one way: `cli` -> `build` -> {`mount`, `run`, `store`, `fsck`} -> `oci` ->
//! `union` -> `sys`.

pub mod build;
pub mod cli;
pub mod digest;
pub mod error;
pub mod fsck;
pub mod fsutil;
pub mod mount;
pub mod oci;
pub mod registry;
pub mod run;
pub mod store;
pub mod sys;
pub mod union;
