//! COPY and ADD steps: Docker's destination rule, the direct COPY from the context into the
//! step's upper (no mount) where that gives what the mount would, the copy through the
//! step's mount otherwise (`--from` reads another stage's or image's root, mounted
//! read-only), and ADD's local archives.
//!
//! Invariants: an archive ADD names is extracted by the hardened layer importer (no path
//! leaves its staging directory, nothing is followed) and copied from there; the direct copy
//! is taken only when no destination directory of the image is a symlink, nothing lands on an
//! image directory as a file or the other way round, and `--chown` is numeric; the image's
//! directories on the way are made in the upper with the image's metadata first, as a copy-up
//! would.

use super::*;

impl Builder<'_> {
    /// Docker's rule: a destination ending in `/` (or `/.`), or several sources, is a
    /// directory; several sources need such a destination.
    pub(super) fn dest_is_dir(
        &self,
        ins: &Located<Instruction>,
        dest_raw: &str,
        sources: usize,
        selected: usize,
    ) -> BResult<bool> {
        let slashed = dest_raw.ends_with('/') || dest_raw.ends_with("/.");
        if (sources > 1 || selected > 1) && !(slashed || dest_raw == ".") {
            return Err(cf_error(
                &self.containerfile,
                format!(
                    "line {}: {}: with more than one source file the destination must be a directory and end with a /",
                    ins.line,
                    ins.value.keyword()
                ),
            ));
        }
        Ok(slashed || sources > 1 || selected > 1)
    }

    /// COPY from the build context straight into the step's upper directory, without a
    /// mount, when that is sure to give what copying through the mount gives: the
    /// destination's directories are real directories of the image (no symlink to follow),
    /// nothing copied lands on a directory of the image as a file or the other way round, and
    /// `--chown` is numeric. The directories of the destination that the image has are
    /// created in the upper with the image's metadata first, as a copy-up would. `None`: use
    /// the mount. (10,000 files: 2.1 s through the mount.)
    pub(super) fn copy_direct(
        &mut self,
        ins: &Located<Instruction>,
        state: &ImageState,
    ) -> BResult<Option<LayerRef>> {
        let Instruction::Copy(c) = &ins.value else {
            return Ok(None);
        };
        if c.from.is_some() {
            return Ok(None);
        }
        let chown = match c.chown.as_deref() {
            None => None,
            Some(spec) => match numeric_owner(spec) {
                Some(o) => Some(o),
                None => return Ok(None),
            },
        };
        let chmod = c.chmod.as_deref().map(copy::parse_chmod).transpose()?;
        let mut selected = Vec::new();
        for src in &c.sources {
            selected.extend(self.context.select(src.as_bytes()).map_err(|e| {
                BuildError::Failed(Error::invalid(format!(
                    "{}:{}: COPY {e}",
                    self.containerfile, ins.line
                )))
            })?);
        }
        let dest_is_dir = self.dest_is_dir(ins, &c.dest, c.sources.len(), selected.len())?;
        let dest = copy::container_path(&state.config.working_dir, &c.dest);
        let ids = state.diff_ids()?;
        let image = ImageView::open(self.store, &ids)?;
        // The destination's chain: directories the image has, until one it lacks.
        let mut chain = Vec::new();
        let mut dest_in_image = true;
        let mut prefix: Vec<u8> = Vec::new();
        for comp in dest.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(comp);
            match image.kind(&prefix)? {
                Found::Dir(ino) => chain.push((prefix.clone(), ino)),
                Found::Missing => {
                    dest_in_image = false;
                    break;
                }
                Found::Other | Found::Symlink => return Ok(None),
            }
        }
        let dest_dir_in_image = dest_in_image;
        for (target, is_dir) in copy::planned_targets(
            &self.context,
            &selected,
            &dest,
            dest_is_dir,
            dest_dir_in_image,
        )? {
            match (image.kind(&target)?, is_dir) {
                (Found::Missing, _) | (Found::Dir(_), true) | (Found::Other, false) => {}
                _ => return Ok(None),
            }
        }
        let staging = self.store.staging()?;
        let upper = staging.path().join("upper");
        std::fs::create_dir(&upper)
            .map_err(|e| Error::io(format!("creating {}", upper.display()), e))?;
        rootfs::prepare_upper(self.store, &upper, &ids)?;
        let upper_fd = sys::open_dir_path(&upper).map_err(|e| Error::io("opening the upper", e))?;
        for (path, ino) in &chain {
            image.recreate_dir(*ino, upper_fd.as_fd(), path)?;
        }
        let t0 = Instant::now();
        copy::copy_into(
            &self.context,
            &selected,
            upper_fd.as_fd(),
            &dest,
            dest_is_dir,
            CopyOptions {
                chown,
                chmod,
                keep_owner: false,
            },
        )?;
        let t1 = Instant::now();
        // The upper holds exactly what its tar says, so it becomes the layer directory as it
        // is; with --source-date-epoch the tar clamps times, and the tar is extracted instead.
        let layer = match self.opts.source_date_epoch {
            None => {
                copy::whole_second_times(upper_fd.as_fd())?;
                ops::layer_from_staged_upper(self.store, &staging, b"upper", self.codec, &|_| {})?
            }
            Some(epoch) => ops::layer_from_upper(
                self.store,
                &upper,
                self.codec,
                export::Options {
                    source_date_epoch: Some(epoch),
                },
                &|_| {},
            )?,
        };
        drop(upper_fd);
        log::debug!(
            "direct copy: copy {:?}, diff and publish {:?}",
            t1 - t0,
            t1.elapsed()
        );
        drop(staging);
        Ok(Some(LayerRef {
            diff_id: layer.diff_id.to_string(),
            blob: layer.blob,
            size: layer.tar_size,
        }))
    }

    pub(super) fn copy(
        &mut self,
        ins: &Located<Instruction>,
        state: &ImageState,
        root: &MountedRoot,
    ) -> BResult<()> {
        let (srcs, chown, chmod) = copy_parts(&ins.value);
        let rootfd = root.open()?;
        let chown = match chown {
            None => None,
            Some(spec) => {
                let u = run::resolve_user_at(rootfd.as_fd(), spec)?;
                Some((u.uid, u.gid))
            }
        };
        let chmod = chmod.map(copy::parse_chmod).transpose()?;
        let dest_raw = match &ins.value {
            Instruction::Copy(c) => c.dest.as_str(),
            Instruction::Add(a) => a.dest.as_str(),
            _ => "",
        };
        let dest = copy::container_path(&state.config.working_dir, dest_raw);
        let from = match &ins.value {
            Instruction::Copy(c) => c.from.clone(),
            _ => None,
        };
        // COPY --from reads another stage's (or image's) root, mounted read-only.
        let from_mount;
        let from_ctx;
        let src_ctx: &Context = match &from {
            None => &self.context,
            Some(f) => {
                let st = self.copied_image(f)?;
                let ids = st.diff_ids()?;
                let mnt = root
                    .path()
                    .parent()
                    .map(|p| p.join("from"))
                    .ok_or_else(|| Error::invalid("no staging dir"))?;
                from_mount = MountedRoot::mount(
                    self.store,
                    &RootSpec {
                        layers: &ids,
                        upper: None,
                        mountpoint: &mnt,
                        options: &[],
                        container: None,
                    },
                )?;
                from_ctx = Context::from_fd(from_mount.open()?, IgnoreRules::default());
                &from_ctx
            }
        };
        let mut selected = Vec::new();
        for s in srcs {
            selected.extend(src_ctx.select(s.as_bytes()).map_err(|e| {
                BuildError::Failed(Error::invalid(format!(
                    "{}:{}: {} {e}",
                    self.containerfile,
                    ins.line,
                    ins.value.keyword()
                )))
            })?);
        }
        let dest_is_dir = self.dest_is_dir(ins, dest_raw, srcs.len(), selected.len())?;
        let opts = CopyOptions {
            chown,
            chmod,
            keep_owner: false,
        };
        if let Instruction::Add(_) = &ins.value {
            // ADD extracts local tar archives (plain, gzip, zstd) into the destination and
            // copies everything else as COPY does.
            let staging = root
                .path()
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::invalid("no staging dir"))?;
            let mut plain = Vec::new();
            for (n, sel) in selected.into_iter().enumerate() {
                match archive_reader(src_ctx, &sel)? {
                    None => plain.push(sel),
                    Some(reader) => {
                        let dir = staging.join(format!("add-{n}"));
                        let tree = extract_archive(reader, &dir).map_err(|e| {
                            Error::invalid(format!(
                                "{}:{}: ADD {}: {e}",
                                self.containerfile,
                                ins.line,
                                crate::error::ShowPath(&sel.path)
                            ))
                        })?;
                        let all = tree.select(b".")?;
                        copy::copy_into(
                            &tree,
                            &all,
                            rootfd.as_fd(),
                            &dest,
                            true,
                            CopyOptions {
                                keep_owner: true,
                                ..opts
                            },
                        )?;
                    }
                }
            }
            copy::copy_into(src_ctx, &plain, rootfd.as_fd(), &dest, dest_is_dir, opts)?;
            return Ok(());
        }
        copy::copy_into(src_ctx, &selected, rootfd.as_fd(), &dest, dest_is_dir, opts)?;
        Ok(())
    }
}

/// A reader of the tar inside a selected file, when it is a tar archive (plain, gzip or
/// zstd; the ustar magic at offset 257 once decompressed).
fn archive_reader(
    ctx: &Context,
    sel: &context::Selected,
) -> Result<Option<Box<dyn std::io::Read>>> {
    use std::io::Read;
    if sel.kind != context::EntryKind::File {
        return Ok(None);
    }
    let entries = ctx.walk(sel)?;
    let Some(entry) = entries.first() else {
        return Ok(None);
    };
    let probe = |f: std::fs::File| -> Result<Option<Box<dyn Read>>> {
        let Ok((_, mut r)) =
            crate::oci::compress::decoder(f, crate::oci::compress::Limits::default())
        else {
            return Ok(None);
        };
        let mut head = vec![0u8; 512];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return Ok(None),
            }
        }
        if got == 512 && &head[257..262] == b"ustar" {
            Ok(Some(Box::new(std::io::Cursor::new(head).chain(r))))
        } else {
            Ok(None)
        }
    };
    probe(ctx.open_entry(entry)?)
}

/// Extract an archive ADD names into `dir` through the hardened layer import (no path
/// leaves `dir`, links stay inside, nothing is followed), as a source to copy from.
fn extract_archive(reader: Box<dyn std::io::Read>, dir: &Path) -> Result<Context> {
    std::fs::create_dir(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let fd = sys::open_dir_path(dir).map_err(|e| Error::io("opening the archive's tree", e))?;
    let formats = crate::oci::import::probe_formats(fd.as_fd());
    let mut tar = crate::oci::tarfmt::TarReader::new(reader);
    crate::oci::import::extract(&mut tar, fd.as_fd(), formats, &|_| {})?;
    Ok(Context::from_fd(fd, IgnoreRules::default()))
}

/// What a path is in an image.
pub(super) enum Found {
    Missing,
    Dir(u64),
    Symlink,
    Other,
}

/// An image's layers seen through the union library, without a mount: for looking paths up
/// and copying a directory's metadata.
pub(super) struct ImageView {
    union: Option<crate::union::Union>,
    /// Directories looked up so far (path -> inode, or missing).
    dirs: std::cell::RefCell<HashMap<Vec<u8>, Option<u64>>>,
}

impl ImageView {
    pub(super) fn open(store: &Store, ids: &[Digest]) -> Result<ImageView> {
        let union = if ids.is_empty() {
            None
        } else {
            Some(crate::union::Union::new(&crate::union::UnionConfig {
                lowers: ids
                    .iter()
                    .rev()
                    .map(|id| crate::store::layers::path(store, id))
                    .collect(),
                upper: None,
                fsync: false,
                redirect_dir: false,
                metacopy: false,
                data_lowers: Vec::new(),
            })?)
        };
        Ok(ImageView {
            union,
            dirs: Default::default(),
        })
    }

    /// The inode of directory `path`, when it is one.
    fn dir(&self, path: &[u8]) -> Result<Option<u64>> {
        let Some(union) = &self.union else {
            return Ok(path.is_empty().then_some(crate::union::ROOT));
        };
        if path.is_empty() {
            return Ok(Some(crate::union::ROOT));
        }
        if let Some(known) = self.dirs.borrow().get(path) {
            return Ok(*known);
        }
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        let found = match self.dir(parent)? {
            None => None,
            Some(p) => match union.lookup(p, name) {
                Ok(a) if a.st.is_dir() => Some(a.ino),
                Ok(_) => None,
                Err(e) if e.is(libc::ENOENT) => None,
                Err(e) => return Err(e),
            },
        };
        self.dirs.borrow_mut().insert(path.to_vec(), found);
        Ok(found)
    }

    pub(super) fn kind(&self, path: &[u8]) -> Result<Found> {
        let Some(union) = &self.union else {
            return Ok(if path.is_empty() {
                Found::Dir(crate::union::ROOT)
            } else {
                Found::Missing
            });
        };
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        if name.is_empty() {
            return Ok(Found::Dir(crate::union::ROOT));
        }
        let Some(p) = self.dir(parent)? else {
            // A parent the image lacks (or that is not a directory: then the parent itself was
            // checked as a target and found wanting).
            return Ok(Found::Missing);
        };
        Ok(match union.lookup(p, name) {
            Ok(a) if a.st.is_dir() => Found::Dir(a.ino),
            Ok(a) if a.st.is_symlink() => Found::Symlink,
            Ok(_) => Found::Other,
            Err(e) if e.is(libc::ENOENT) => Found::Missing,
            Err(e) => return Err(e),
        })
    }

    /// Make directory `path` in `upper` with the mode, owner, times and xattrs directory
    /// `ino` of the image has (what a copy-up of it writes).
    fn recreate_dir(&self, ino: u64, upper: BorrowedFd<'_>, path: &[u8]) -> Result<()> {
        let Some(union) = &self.union else {
            return Ok(());
        };
        let st = union.getattr(ino)?.st;
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        let pfd = sys::open_dir_beneath(upper, parent)
            .map_err(|e| Error::io(format!("opening /{}", crate::error::ShowPath(parent)), e))?;
        let io = |what: &str, e| Error::io(format!("{what} /{}", crate::error::ShowPath(path)), e);
        sys::mkdir_at(pfd.as_fd(), name, 0o700).map_err(|e| io("creating", e))?;
        let fd = sys::open_at(pfd.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| io("opening", e))?;
        for x in union.listxattr(ino)? {
            if crate::oci::keep_xattr(&x) {
                let v = union.getxattr(ino, &x)?;
                sys::xattr_set(sys::XTarget::Fd(fd.as_fd()), &x, &v, 0)
                    .map_err(|e| io("copying xattrs of", e))?;
            }
        }
        sys::fchown(fd.as_fd(), Some(st.uid), Some(st.gid)).map_err(|e| io("chown", e))?;
        sys::fchmod(fd.as_fd(), st.perm()).map_err(|e| io("chmod", e))?;
        sys::futimens(
            fd.as_fd(),
            sys::SetTime::At(st.atime),
            sys::SetTime::At(st.mtime),
        )
        .map_err(|e| io("setting times of", e))
    }
}
