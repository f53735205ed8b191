//! Copy-up origins: which lower object an upper object was copied from, recorded as kernel
//! overlayfs records it, so both give a copied-up object the inode number of its origin.
//!
//! On disk (kernel overlayfs' `struct ovl_fb`, `Documentation/filesystems/overlayfs.rst`):
//! `<ns>.overlay.origin` on the upper object holds
//!
//! ```text
//! version (0) | magic (0xfb) | len | flags | handle type | fs uuid (16) | handle (len - 21)
//! ```
//!
//! where the handle is what `name_to_handle_at` gives for the lower object, the uuid is the
//! lower filesystem's (`FS_IOC_GETFSUUID`; zero when it has none) and the flags are 0 on a
//! little-endian host (bit 0: big-endian handle, bit 1: any endianness, bit 2: the handle is
//! of an upper object). An empty value means "copied up, origin unknown": the kernel writes it
//! when the lower filesystem cannot give handles. Before this format layerfs wrote
//! `<ns>.layerfs.origin`, the inode number itself as 8 little-endian bytes; it is still read
//! (never written), so uppers made before keep their numbers.
//!
//! What layerfs writes and when, as the kernel (without `index=on`) does: an origin for every
//! copied-up directory and every other object whose lower has one link (a copy of a hard-linked
//! lower breaks the link, so the lower number is not its own), empty when the lower filesystem
//! gives no handles. One difference: the kernel writes the empty value when the mounter lacks
//! `CAP_DAC_READ_SEARCH`; layerfs writes the handle anyway (`name_to_handle_at` needs no
//! privilege), so a later privileged mount, layerfs or kernel, can use it.
//!
//! Which number an upper object shows (`Union::origin_ino`): the lower object the origin
//! names, found at the same path in the layers below (handles compared: cheap, unprivileged),
//! else decoded with `open_by_handle_at` when the daemon may (`O_PATH`, only `fstat`ed: a
//! handle may name any object of its filesystem); for an empty origin, the lower object at the
//! same path if it is of the same type (the kernel does so for directories and shows a file's
//! own number; layerfs keeps the lower number, stable across copy-up and remount unless the
//! object is renamed). A non-directory origin with more than one link gives no number, as in
//! the kernel. Without a number from its origin an object shows its own.
//!
//! [`encode`], [`parse`] and [`parse_legacy`] are pure: values in, decisions out. A value
//! comes from disk and may be anything; every length is checked and garbage reads as
//! [`Origin::Invalid`], which gives no number and never an error.

/// `OVL_FH_VERSION`.
pub const FH_VERSION: u8 = 0;
/// `OVL_FH_MAGIC`.
pub const FH_MAGIC: u8 = 0xfb;
/// Bytes before the handle: version, magic, len, flags, type, uuid.
pub const FH_HEADER: usize = 5 + 16;
/// The handle bytes are in big-endian order.
pub const FLAG_BIG_ENDIAN: u8 = 1 << 0;
/// The handle bytes are the same in either order.
pub const FLAG_ANY_ENDIAN: u8 = 1 << 1;
/// The handle is of an upper object (the kernel's index; never on an origin it writes).
pub const FLAG_PATH_UPPER: u8 = 1 << 2;
const FLAGS_ALL: u8 = FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER;
/// What this host writes (the kernel's `OVL_FH_FLAG_CPU_ENDIAN`).
const FLAG_CPU_ENDIAN: u8 = if cfg!(target_endian = "big") {
    FLAG_BIG_ENDIAN
} else {
    0
};
/// Longest handle the kernel hands out (`MAX_HANDLE_SZ`).
pub const MAX_HANDLE_SZ: usize = 128;

/// A lower object's identity as recorded in an origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHandle {
    /// The handle type (`handle_type` of `name_to_handle_at`, one byte on disk).
    pub kind: u8,
    /// The uuid of the filesystem the handle belongs to (zero when it has none).
    pub uuid: [u8; 16],
    /// The handle's bytes.
    pub bytes: Vec<u8>,
}

impl FileHandle {
    /// Whether `name_to_handle_at` result (`kind`, `bytes`) of an object on a filesystem with
    /// uuid `uuid` (`None`: unknown) is this handle.
    pub fn is(&self, kind: i32, bytes: &[u8], uuid: Option<[u8; 16]>) -> bool {
        i32::from(self.kind) == kind && self.bytes == bytes && uuid.is_none_or(|u| u == self.uuid)
    }
}

/// What an `overlay.origin` value says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Copied up from the object with this handle.
    Handle(FileHandle),
    /// Copied up, origin unknown: the empty value, or a version, flags or byte order this
    /// host cannot read (the kernel reads those so too).
    Unknown,
    /// Not an origin at all (the kernel refuses to look such an object up).
    Invalid,
}

/// The `overlay.origin` value for the object `name_to_handle_at` gave (`kind`, `bytes`) on a
/// filesystem with uuid `uuid`; `None` when the handle cannot be recorded (the caller then
/// records an unknown origin, as the kernel does for filesystems without handles).
pub fn encode(kind: i32, bytes: &[u8], uuid: [u8; 16]) -> Option<Vec<u8>> {
    let kind = u8::try_from(kind).ok()?;
    if bytes.is_empty() || bytes.len() > MAX_HANDLE_SZ {
        return None;
    }
    let len = u8::try_from(FH_HEADER + bytes.len()).ok()?;
    let mut v = Vec::with_capacity(len as usize);
    v.extend_from_slice(&[FH_VERSION, FH_MAGIC, len, FLAG_CPU_ENDIAN, kind]);
    v.extend_from_slice(&uuid);
    v.extend_from_slice(bytes);
    Some(v)
}

/// Read an `overlay.origin` value, with the kernel's checks (`ovl_check_fb_len`): too short,
/// shorter than it says or without the magic is invalid; a newer version, unknown flags or the
/// other byte order is "origin unknown".
pub fn parse(value: &[u8]) -> Origin {
    if value.is_empty() {
        return Origin::Unknown;
    }
    if value.len() < FH_HEADER || value[1] != FH_MAGIC {
        return Origin::Invalid;
    }
    let (version, len, flags, kind) = (value[0], value[2] as usize, value[3], value[4]);
    if len < FH_HEADER || value.len() < len {
        return Origin::Invalid;
    }
    if version > FH_VERSION || flags & !FLAGS_ALL != 0 {
        return Origin::Unknown;
    }
    if flags & FLAG_ANY_ENDIAN == 0 && flags & FLAG_BIG_ENDIAN != FLAG_CPU_ENDIAN {
        return Origin::Unknown;
    }
    let bytes = &value[FH_HEADER..len];
    if bytes.is_empty() || bytes.len() > MAX_HANDLE_SZ {
        return Origin::Invalid;
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&value[5..FH_HEADER]);
    Origin::Handle(FileHandle {
        kind,
        uuid,
        bytes: bytes.to_vec(),
    })
}

/// Read the older `*.layerfs.origin` value: an inode number as 8 little-endian bytes. Numbers
/// the union never hands out (0 and the root's 1) are not origins.
pub fn parse_legacy(value: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(value.try_into().ok()?);
    (n > super::inode::ROOT_INO).then_some(n)
}

// ---------------------------------------------------------------------------------------------
// The union's side: what to record at copy-up, and which number a recorded origin gives.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use super::Union;
use crate::sys::{self, FileStat, XTarget};

/// An origin xattr as found on an upper object (name and value), to carry over when the object
/// is rebuilt.
pub struct Recorded {
    pub name: &'static [u8],
    pub value: Vec<u8>,
}

impl Union {
    /// The uuid recorded for objects of the filesystem `dev` (zero when unknown, as the kernel
    /// has it for filesystems without one).
    fn uuid_of(&self, dev: u64) -> [u8; 16] {
        self.layers
            .iter()
            .find(|l| l.dev == dev)
            .and_then(|l| l.uuid)
            .unwrap_or([0; 16])
    }

    /// The `overlay.origin` value to record on the copy of `src` (stat `st`), or `None` for
    /// none. As the kernel (without its inode index): none for a non-directory with more than
    /// one link (the copy breaks the hard link, so the lower number is not its alone); an
    /// empty value ("origin unknown") when the lower filesystem gives no file handles.
    pub(super) fn origin_value(&self, src: XTarget<'_>, st: &FileStat) -> Option<Vec<u8>> {
        if !st.is_dir() && st.nlink > 1 {
            return None;
        }
        let encoded = match sys::name_to_handle(src) {
            Ok((kind, bytes)) => encode(kind, &bytes, self.uuid_of(st.dev)),
            Err(e) => {
                log::debug!("copy-up: no file handle for the origin: {e}");
                None
            }
        };
        Some(encoded.unwrap_or_default())
    }

    /// The origin recorded on upper object `dir`/`name`, in either form, as it is.
    pub(super) fn recorded_origin(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Option<Recorded> {
        let target = Self::xtarget(dir, name);
        for attr in [self.xattr_ns.origin(), self.xattr_ns.legacy_origin()] {
            if let Ok(Some(value)) = sys::xattr_get(target, attr) {
                return Some(Recorded { name: attr, value });
            }
        }
        None
    }

    /// The stable number of upper object `dir`/`name` (stat `st`, in directory `parent` at
    /// `parent_path`) from its recorded origin; `None` when it has none that can be found.
    ///
    /// A kernel-format origin is looked for first at the same path in the layers below (one
    /// `name_to_handle_at`, no privilege needed: copied-up objects that were not renamed),
    /// then, when the daemon may, by decoding the handle (`open_by_handle_at`, `O_PATH`, only
    /// `fstat`ed) on the lower filesystems whose uuid it names. An empty origin takes the lower
    /// object at the same path if it is of the same type. As the kernel does, a non-directory
    /// origin with more than one link gives no number. The older `*.layerfs.origin` is the
    /// number itself. Whatever the xattr holds, a bad value only means "no origin".
    /// `present`: the object's xattr names when the caller listed them (no read is made for
    /// a name that is not there).
    pub(super) fn origin_ino(
        &self,
        dir: BorrowedFd<'_>,
        parent: u64,
        parent_path: &[u8],
        name: &[u8],
        st: &FileStat,
        present: Option<&[Vec<u8>]>,
    ) -> Option<u64> {
        let target = Self::xtarget(dir, name);
        let get = |attr: &[u8]| match present {
            Some(names) if !names.iter().any(|n| n == attr) => Ok(None),
            _ => sys::xattr_get(target, attr),
        };
        let lower = match get(self.xattr_ns.origin()) {
            Ok(Some(value)) => match parse(&value) {
                Origin::Handle(fh) => self
                    .origin_at_path(parent, parent_path, name, st, Some(&fh))
                    .or_else(|| self.origin_by_handle(&fh, st)),
                Origin::Unknown => self.origin_at_path(parent, parent_path, name, st, None),
                Origin::Invalid => None,
            },
            Ok(None) => {
                let value = get(self.xattr_ns.legacy_origin()).ok()??;
                return parse_legacy(&value);
            }
            Err(_) => None,
        }?;
        if !lower.is_dir() && lower.nlink > 1 {
            return None;
        }
        self.table().inos.map(lower.dev, lower.ino)
    }

    /// The object at `parent_path`/`name` in the topmost lower layer of the parent that has
    /// the name, if it is the origin: the object `fh` names (when given), of the same type as
    /// the upper object `st`.
    fn origin_at_path(
        &self,
        parent: u64,
        parent_path: &[u8],
        name: &[u8],
        st: &FileStat,
        fh: Option<&FileHandle>,
    ) -> Option<FileStat> {
        let pnode = self.table().get(parent).cloned()?;
        let merge = pnode.lock().merge.clone();
        for &layer in merge.iter().filter(|&&l| Some(l) != self.upper) {
            let Ok(dfd) = self.dir_fd(layer, &self.lpath(parent, layer, parent_path)) else {
                continue;
            };
            if let Some(fh) = fh {
                match sys::name_to_handle(XTarget::At(dfd.as_fd(), name)) {
                    Ok((kind, bytes)) => {
                        if !fh.is(kind, &bytes, self.layers[layer as usize].uuid) {
                            return None;
                        }
                    }
                    Err(e) if super::is_missing(&e) => continue,
                    Err(_) => return None,
                }
            }
            return match sys::stat_at(dfd.as_fd(), name) {
                Ok(lst) => (lst.file_type() == st.file_type()).then_some(lst),
                Err(e) if super::is_missing(&e) && fh.is_none() => continue,
                Err(_) => None,
            };
        }
        None
    }

    /// The object `fh` names, decoded on each lower filesystem whose uuid it carries, if the
    /// daemon may decode handles and it is of the same type as the upper object `st`. The
    /// handle may name any object of that filesystem: the descriptor is `O_PATH` and only
    /// `fstat`ed.
    fn origin_by_handle(&self, fh: &FileHandle, st: &FileStat) -> Option<FileStat> {
        if !self.handle_decode.load(Ordering::Relaxed) {
            return None;
        }
        let mut tried: Vec<u64> = Vec::new();
        // Data-only layers hold no object a copy-up could have come from.
        for (i, layer) in self.layers.iter().enumerate().take(self.data_from.into()) {
            if Some(i as u16) == self.upper || tried.contains(&layer.dev) {
                continue;
            }
            if layer.uuid.is_some_and(|u| u != fh.uuid) {
                continue;
            }
            tried.push(layer.dev);
            match sys::open_by_handle(layer.root.as_fd(), i32::from(fh.kind), &fh.bytes) {
                Ok(fd) => {
                    let lst = sys::fstat(fd.as_fd()).ok()?;
                    return (lst.file_type() == st.file_type()).then_some(lst);
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    log::info!("origins are found by path only: {e}");
                    self.handle_decode.store(false, Ordering::Relaxed);
                    return None;
                }
                Err(_) => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kernel 6.18 wrote for a lower file on an ext4 with a null uuid (`getfattr -e hex`
    /// of an upper after `chmod` through `mount -t overlay`).
    const KERNEL_EXT4: &[u8] = b"\x00\xfb\x1d\x00\x01\
        \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
        \xf3\x1f\x9e\x00\xd6\x38\xaa\xb9";

    fn uuid(b: u8) -> [u8; 16] {
        [b; 16]
    }

    #[test]
    fn the_kernels_bytes_read_back_and_encode_the_same() {
        let want = FileHandle {
            kind: 1,
            uuid: [0; 16],
            bytes: b"\xf3\x1f\x9e\x00\xd6\x38\xaa\xb9".to_vec(),
        };
        assert_eq!(parse(KERNEL_EXT4), Origin::Handle(want.clone()));
        assert_eq!(
            encode(1, &want.bytes, [0; 16]).as_deref(),
            Some(KERNEL_EXT4)
        );
        assert!(want.is(1, &want.bytes, Some([0; 16])));
        assert!(
            want.is(1, &want.bytes, None),
            "unknown uuid: the handle decides"
        );
        assert!(!want.is(1, &want.bytes, Some(uuid(7))));
        assert!(!want.is(2, &want.bytes, None));
        assert!(!want.is(1, &want.bytes[..4], None));
    }

    #[test]
    fn encode_round_trips_and_refuses_what_does_not_fit() {
        for (kind, len) in [
            (1, 8),
            (1, 12),
            (0x4d, 20),
            (0x81, 12),
            (255, MAX_HANDLE_SZ),
        ] {
            let bytes: Vec<u8> = (0..len as u8).collect();
            let v = encode(kind, &bytes, uuid(9)).expect("fits");
            assert_eq!(v.len(), FH_HEADER + len);
            assert_eq!(v[2] as usize, v.len());
            let want = FileHandle {
                kind: kind as u8,
                uuid: uuid(9),
                bytes,
            };
            assert_eq!(parse(&v), Origin::Handle(want));
        }
        for (kind, len) in [(1, 0), (1, MAX_HANDLE_SZ + 1), (256, 8), (-1, 8)] {
            assert_eq!(encode(kind, &vec![1; len], uuid(0)), None, "{kind} {len}");
        }
    }

    #[test]
    fn hostile_and_foreign_values() {
        let good = encode(1, &[1, 2, 3, 4, 5, 6, 7, 8], uuid(3)).unwrap();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty: copied up, origin unknown", vec![], "unknown"),
            ("one byte", vec![0], "invalid"),
            ("header only", good[..FH_HEADER].to_vec(), "invalid"),
            ("fsck test's two bytes", b"\x00\xfb".to_vec(), "invalid"),
            ("bad magic", with(1, 0xfa), "invalid"),
            (
                "len above the value",
                with(2, good.len() as u8 + 1),
                "invalid",
            ),
            ("len 255 on a short value", with(2, 255), "invalid"),
            ("len below the header", with(2, 3), "invalid"),
            (
                "len = header: no handle",
                with(2, FH_HEADER as u8),
                "invalid",
            ),
            ("newer version", with(0, 1), "unknown"),
            ("unknown flag", with(3, 0x10), "unknown"),
            (
                "other byte order",
                with(3, FLAG_BIG_ENDIAN ^ FLAG_CPU_ENDIAN),
                "unknown",
            ),
            ("any byte order", with(3, FLAG_ANY_ENDIAN), "handle"),
            ("upper flag", with(3, FLAG_PATH_UPPER), "handle"),
            ("bytes after len", trailing, "handle"),
            ("all 0xff", vec![0xff; 64], "invalid"),
            (
                "the legacy form",
                12345u64.to_le_bytes().to_vec(),
                "invalid",
            ),
        ];
        for (what, v, want) in cases {
            let got = match parse(&v) {
                Origin::Handle(fh) => {
                    assert_eq!(fh.bytes, [1, 2, 3, 4, 5, 6, 7, 8], "{what}");
                    "handle"
                }
                Origin::Unknown => "unknown",
                Origin::Invalid => "invalid",
            };
            assert_eq!(got, want, "{what}");
        }
        // Every prefix and every single-byte change of a good value reads without a panic.
        for n in 0..=good.len() {
            let _ = parse(&good[..n]);
        }
        for i in 0..good.len() {
            for b in [0u8, 1, 0x7f, 0x80, 0xfb, 0xff] {
                let _ = parse(&with(i, b));
            }
        }
    }

    #[test]
    fn legacy_values() {
        assert_eq!(parse_legacy(&42u64.to_le_bytes()), Some(42));
        assert_eq!(parse_legacy(&(1u64 << 50).to_le_bytes()), Some(1 << 50));
        for bad in [
            &[][..],
            &[1, 2, 3],
            &[0; 8],
            &[1, 0, 0, 0, 0, 0, 0, 0],
            &[9; 9],
        ] {
            assert_eq!(parse_legacy(bad), None, "{bad:?}");
        }
    }
}
