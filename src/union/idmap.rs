//! Id mapping between the ids stored on disk and the ids a mount shows (`uidmapping=`,
//! `gidmapping=`, `squash_to_*`), as fuse-overlayfs and kernel idmapped mounts apply it.
//!
//! A mapping is a list of triples `DISK:SHOWN:LENGTH`: ids `DISK..DISK+LENGTH` on disk are
//! shown as `SHOWN..SHOWN+LENGTH` through the mount. containers-storage writes the triples
//! from its id mappings as `ContainerID:HostID:Size`: the layers hold the image's ids
//! (container ids), and the mount shows them as the ids of the namespace the container's user
//! namespace maps them from, so that the container sees its image's owners again. For
//! `podman run --userns=keep-id` as uid 1002 that is `0:1:1002:1002:0:1:1003:1003:64533`.
//!
//! Invariants:
//! - Ranges overlap neither on disk nor as shown, so the mapping is a bijection between the
//!   ids it covers; an empty mapping is the identity.
//! - An id on disk that no range covers is shown as [`OVERFLOW_ID`], as the kernel shows ids
//!   outside a user namespace. An id shown that no range covers has no id on disk: a change to
//!   it fails with EOVERFLOW (a chown to it, a new object by such a caller), as on a kernel
//!   idmapped mount.
//! - `squash_to_*` changes only what is shown; what is stored still goes through the mapping
//!   (fuse-overlayfs does the same).
//! - Ids inside xattr values are mapped too: the entries of POSIX ACLs and the root id of file
//!   capabilities, as kernel overlayfs over idmapped layers maps them. A capability whose root
//!   id the mapping does not cover is hidden (ENODATA): it belongs to no namespace this mount
//!   shows, so it must grant nothing, and an executable carrying it must still run (the
//!   kernel's getxattr answers EOVERFLOW there, but its exec path treats the capability as
//!   absent; over FUSE the exec path sees our answer, so absent is the one that keeps both).

use std::fmt;

/// The id shown for an id that no range maps (the kernel's overflow id).
pub const OVERFLOW_ID: u32 = 65534;

/// One range: ids `disk..disk+len` on disk are shown as `shown..shown+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

/// A list of ranges; empty is the identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap(Vec<IdRange>);

/// Why a mapping was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapError(String);

impl fmt::Display for IdMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdMapError {}

/// `start..start+len` fits in u32 ids, the last one (`u32::MAX`, "no id") excluded.
fn range_fits(start: u32, len: u32) -> bool {
    u64::from(start) + u64::from(len) <= u64::from(u32::MAX)
}

fn overlaps(a_start: u32, a_len: u32, b_start: u32, b_len: u32) -> bool {
    let (a0, a1) = (u64::from(a_start), u64::from(a_start) + u64::from(a_len));
    let (b0, b1) = (u64::from(b_start), u64::from(b_start) + u64::from(b_len));
    a0 < b1 && b0 < a1
}

impl IdMap {
    /// Parse `DISK:SHOWN:LEN[:DISK:SHOWN:LEN...]` (fuse-overlayfs also accepts `,` between
    /// triples, and containers-storage may start the list with a separator).
    pub fn parse(spec: &str) -> Result<IdMap, IdMapError> {
        let nums: Result<Vec<u32>, _> = spec
            .split([':', ','])
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect();
        let nums = nums.map_err(|_| IdMapError(format!("bad id mapping {spec:?}")))?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(IdMapError(format!(
                "bad id mapping {spec:?}: want disk:shown:length triples"
            )));
        }
        let ranges: Vec<IdRange> = nums
            .chunks_exact(3)
            .map(|c| IdRange {
                disk: c[0],
                shown: c[1],
                len: c[2],
            })
            .collect();
        IdMap::new(ranges).map_err(|e| IdMapError(format!("bad id mapping {spec:?}: {e}")))
    }

    /// A mapping of these ranges, checked: no empty range, no range past the last id, no
    /// overlap on either side.
    pub fn new(ranges: Vec<IdRange>) -> Result<IdMap, IdMapError> {
        for (i, r) in ranges.iter().enumerate() {
            if r.len == 0 {
                return Err(IdMapError("a range of length 0".into()));
            }
            if !range_fits(r.disk, r.len) || !range_fits(r.shown, r.len) {
                return Err(IdMapError(format!(
                    "range {}:{}:{} goes past the last id",
                    r.disk, r.shown, r.len
                )));
            }
            for o in &ranges[..i] {
                if overlaps(r.disk, r.len, o.disk, o.len)
                    || overlaps(r.shown, r.len, o.shown, o.len)
                {
                    return Err(IdMapError(format!(
                        "ranges {}:{}:{} and {}:{}:{} overlap",
                        o.disk, o.shown, o.len, r.disk, r.shown, r.len
                    )));
                }
            }
        }
        Ok(IdMap(ranges))
    }

    pub fn ranges(&self) -> &[IdRange] {
        &self.0
    }

    pub fn is_identity(&self) -> bool {
        self.0.is_empty()
    }

    /// Id on disk -> id shown through the mount ([`OVERFLOW_ID`] when unmapped).
    pub fn to_shown(&self, disk: u32) -> u32 {
        if self.0.is_empty() {
            return disk;
        }
        self.0
            .iter()
            .find(|r| disk >= r.disk && disk - r.disk < r.len)
            .map_or(OVERFLOW_ID, |r| r.shown + (disk - r.disk))
    }

    /// Id shown (given by a user of the mount) -> id stored on disk, if it is mapped.
    pub fn to_disk(&self, shown: u32) -> Option<u32> {
        if self.0.is_empty() {
            return Some(shown);
        }
        self.0
            .iter()
            .find(|r| shown >= r.shown && shown - r.shown < r.len)
            .map(|r| r.disk + (shown - r.shown))
    }

    /// [`IdMap::to_shown`], but `None` where the id is not mapped.
    fn to_shown_mapped(&self, disk: u32) -> Option<u32> {
        if self.0.is_empty() {
            return Some(disk);
        }
        self.0
            .iter()
            .find(|r| disk >= r.disk && disk - r.disk < r.len)
            .map(|r| r.shown + (disk - r.disk))
    }
}

/// How ids are shown through a mount and stored from it.
#[derive(Clone, Debug, Default)]
pub struct IdView {
    /// Show every object as owned by this uid (`squash_to_uid`, `squash_to_root`).
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    /// `uidmapping=`/`gidmapping=`.
    pub uid_map: IdMap,
    pub gid_map: IdMap,
}

/// Which way an xattr value is converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToShown,
    ToDisk,
}

/// What became of an xattr value whose ids were mapped.
#[derive(Debug, PartialEq, Eq)]
pub enum MappedXattr {
    /// The value, with its ids mapped.
    Value(Vec<u8>),
    Unchanged,
    /// The value names an id the mapping does not cover.
    Unmapped,
}

const ACL_XATTR_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const ACL_HEADER_LEN: usize = 4;
const ACL_ENTRY_LEN: usize = 8;

const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
/// Revision 2 ends where revision 3 adds the root uid.
const VFS_CAP_V2_LEN: usize = 20;
const VFS_CAP_V3_LEN: usize = 24;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl IdView {
    pub fn is_identity(&self) -> bool {
        self.squash_uid.is_none()
            && self.squash_gid.is_none()
            && self.uid_map.is_identity()
            && self.gid_map.is_identity()
    }

    /// The uid shown for an object whose uid on disk is `disk`.
    pub fn shown_uid(&self, disk: u32) -> u32 {
        self.squash_uid
            .unwrap_or_else(|| self.uid_map.to_shown(disk))
    }

    pub fn shown_gid(&self, disk: u32) -> u32 {
        self.squash_gid
            .unwrap_or_else(|| self.gid_map.to_shown(disk))
    }

    pub fn disk_uid(&self, shown: u32) -> Option<u32> {
        self.uid_map.to_disk(shown)
    }

    pub fn disk_gid(&self, shown: u32) -> Option<u32> {
        self.gid_map.to_disk(shown)
    }

    /// Map the ids inside an xattr value read from disk (POSIX ACL entries, the root id of a
    /// v3 file capability) to the ids the mount shows.
    pub fn xattr_to_shown(&self, name: &[u8], value: &[u8]) -> MappedXattr {
        self.map_xattr(name, value, Direction::ToShown)
    }

    /// Map the ids inside an xattr value set through the mount to the ids stored on disk.
    pub fn xattr_to_disk(&self, name: &[u8], value: &[u8]) -> MappedXattr {
        self.map_xattr(name, value, Direction::ToDisk)
    }

    fn map_id(map: &IdMap, id: u32, dir: Direction) -> Option<u32> {
        match dir {
            Direction::ToShown => map.to_shown_mapped(id),
            Direction::ToDisk => map.to_disk(id),
        }
    }

    fn map_xattr(&self, name: &[u8], value: &[u8], dir: Direction) -> MappedXattr {
        if self.uid_map.is_identity() && self.gid_map.is_identity() {
            return MappedXattr::Unchanged;
        }
        match name {
            b"system.posix_acl_access" | b"system.posix_acl_default" => self.map_acl(value, dir),
            b"security.capability" => self.map_capability(value, dir),
            _ => MappedXattr::Unchanged,
        }
    }

    /// A POSIX ACL xattr: a version word, then (tag u16, perm u16, id u32) entries, all
    /// little-endian; only named user and group entries carry an id. A malformed value is left
    /// to the filesystem below to judge.
    fn map_acl(&self, value: &[u8], dir: Direction) -> MappedXattr {
        if le32(value, 0) != Some(ACL_XATTR_VERSION)
            || (value.len() - ACL_HEADER_LEN) % ACL_ENTRY_LEN != 0
        {
            return MappedXattr::Unchanged;
        }
        let mut out = value.to_vec();
        for at in (ACL_HEADER_LEN..value.len()).step_by(ACL_ENTRY_LEN) {
            let tag = u16::from_le_bytes([value[at], value[at + 1]]);
            let map = match tag {
                ACL_USER => &self.uid_map,
                ACL_GROUP => &self.gid_map,
                _ => continue,
            };
            let Some(id) = le32(value, at + 4) else {
                return MappedXattr::Unchanged;
            };
            let mapped = match (Self::map_id(map, id, dir), dir) {
                (Some(m), _) => m,
                // Shown as the overflow id, as the kernel shows an ACL entry of an id outside
                // the reader's namespace.
                (None, Direction::ToShown) => OVERFLOW_ID,
                (None, Direction::ToDisk) => return MappedXattr::Unmapped,
            };
            out[at + 4..at + 8].copy_from_slice(&mapped.to_le_bytes());
        }
        MappedXattr::Value(out)
    }

    /// `security.capability`, as overlayfs over an idmapped layer keeps it: revision 3 names
    /// the root uid of the namespace the capability is for; revision 2 means the root of the
    /// filesystem's own ids (id 0 on disk). Shown, both become revision 3 with the mapped root
    /// (the kernel turns that back into revision 2 for a reader whose root it is); stored, a
    /// capability for disk id 0 is written as revision 2.
    fn map_capability(&self, value: &[u8], dir: Direction) -> MappedXattr {
        if self.uid_map.is_identity() {
            return MappedXattr::Unchanged;
        }
        let Some(magic) = le32(value, 0) else {
            return MappedXattr::Unchanged;
        };
        let root = match (magic & VFS_CAP_REVISION_MASK, value.len()) {
            (VFS_CAP_REVISION_2, VFS_CAP_V2_LEN) => 0,
            (VFS_CAP_REVISION_3, VFS_CAP_V3_LEN) => match le32(value, VFS_CAP_V2_LEN) {
                Some(root) => root,
                None => return MappedXattr::Unchanged,
            },
            // Malformed: left to the kernel (or the filesystem below) to refuse.
            _ => return MappedXattr::Unchanged,
        };
        let Some(mapped) = Self::map_id(&self.uid_map, root, dir) else {
            return MappedXattr::Unmapped;
        };
        let flags = magic & !VFS_CAP_REVISION_MASK;
        let body = &value[4..VFS_CAP_V2_LEN];
        let mut out = Vec::with_capacity(VFS_CAP_V3_LEN);
        if dir == Direction::ToDisk && mapped == 0 {
            out.extend_from_slice(&(VFS_CAP_REVISION_2 | flags).to_le_bytes());
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(&(VFS_CAP_REVISION_3 | flags).to_le_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(&mapped.to_le_bytes());
        }
        if out == value {
            MappedXattr::Unchanged
        } else {
            MappedXattr::Value(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(spec: &str) -> IdMap {
        IdMap::parse(spec).expect(spec)
    }

    #[test]
    fn ids_shown_and_stored() {
        // (spec, id on disk, id shown); the pair must map both ways.
        let cases: &[(&str, u32, u32)] = &[
            // podman --uidmap 0:100:5000: the image's root is shown as 100, which the
            // container's user namespace maps back to 0.
            ("0:100:5000", 0, 100),
            ("0:100:5000", 4999, 5099),
            // keep-id as uid 1002 in a rootless namespace (subordinate ids from 1).
            ("0:1:1002:1002:0:1:1003:1003:64533", 0, 1),
            ("0:1:1002:1002:0:1:1003:1003:64533", 1001, 1002),
            ("0:1:1002:1002:0:1:1003:1003:64533", 1002, 0),
            ("0:1:1002:1002:0:1:1003:1003:64533", 1003, 1003),
            ("0:1:1002:1002:0:1:1003:1003:64533", 65535, 65535),
            // containers-storage may lead with a separator; fuse-overlayfs takes commas.
            (":0:1:1002:1002:0:1", 1002, 0),
            ("0:1000:1,1:100000:65536", 5, 100004),
        ];
        for &(spec, disk, shown) in cases {
            let m = map(spec);
            assert_eq!(m.to_shown(disk), shown, "{spec}: disk {disk}");
            assert_eq!(m.to_disk(shown), Some(disk), "{spec}: shown {shown}");
        }
    }

    #[test]
    fn unmapped_ids() {
        let m = map("0:100:5000");
        assert_eq!(m.to_shown(5000), OVERFLOW_ID);
        assert_eq!(m.to_shown(u32::MAX - 1), OVERFLOW_ID);
        assert_eq!(m.to_disk(99), None);
        assert_eq!(m.to_disk(5100), None);
        assert_eq!(m.to_disk(0), None);
        let id = IdMap::default();
        assert!(id.is_identity());
        assert_eq!((id.to_shown(42), id.to_disk(42)), (42, Some(42)));
    }

    #[test]
    fn bad_mappings_are_refused() {
        for spec in [
            "0:1",
            "a:b:c",
            "",
            "0:0:0",
            "0:1:-1",
            "4294967295:0:1",
            "0:4294967290:10",
            // overlapping on disk, then as shown
            "0:100:10:5:200:10",
            "0:100:10:50:105:10",
        ] {
            assert!(IdMap::parse(spec).is_err(), "{spec:?} accepted");
        }
        assert!(IdMap::parse("0:100:10:10:110:10").is_ok());
    }

    #[test]
    fn squash_changes_only_what_is_shown() {
        let v = IdView {
            squash_uid: Some(0),
            squash_gid: None,
            uid_map: map("0:100:10"),
            gid_map: map("0:200:10"),
        };
        assert_eq!(v.shown_uid(5), 0);
        assert_eq!(v.shown_uid(50), 0);
        assert_eq!(v.shown_gid(5), 205);
        assert_eq!(v.shown_gid(50), OVERFLOW_ID);
        assert_eq!(v.disk_uid(105), Some(5));
        assert_eq!(v.disk_uid(0), None);
        assert_eq!(v.disk_gid(209), Some(9));
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = ACL_XATTR_VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    fn cap_v2() -> Vec<u8> {
        cap_v3(0)[..VFS_CAP_V2_LEN]
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 3 { 0x02 } else { b })
            .collect()
    }

    fn cap_v3(root: u32) -> Vec<u8> {
        let mut v = (VFS_CAP_REVISION_3 | 1).to_le_bytes().to_vec();
        v.extend_from_slice(&[0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        v.extend_from_slice(&root.to_le_bytes());
        v
    }

    #[test]
    fn ids_inside_xattrs() {
        const UNDEFINED: u32 = u32::MAX;
        let v = IdView {
            uid_map: map("0:100:10"),
            gid_map: map("0:200:10"),
            ..IdView::default()
        };
        let disk = acl(&[
            (0x01, 6, UNDEFINED),
            (ACL_USER, 4, 3),
            (0x04, 4, UNDEFINED),
            (ACL_GROUP, 5, 7),
            (0x10, 7, UNDEFINED),
            (0x20, 0, UNDEFINED),
        ]);
        let shown = acl(&[
            (0x01, 6, UNDEFINED),
            (ACL_USER, 4, 103),
            (0x04, 4, UNDEFINED),
            (ACL_GROUP, 5, 207),
            (0x10, 7, UNDEFINED),
            (0x20, 0, UNDEFINED),
        ]);
        let cases: &[(&[u8], &[u8], MappedXattr, MappedXattr)] = &[
            (
                b"system.posix_acl_access",
                &disk,
                MappedXattr::Value(shown.clone()),
                MappedXattr::Unmapped,
            ),
            (
                b"system.posix_acl_default",
                &shown,
                MappedXattr::Value(acl(&[
                    (0x01, 6, UNDEFINED),
                    (ACL_USER, 4, OVERFLOW_ID),
                    (0x04, 4, UNDEFINED),
                    (ACL_GROUP, 5, OVERFLOW_ID),
                    (0x10, 7, UNDEFINED),
                    (0x20, 0, UNDEFINED),
                ])),
                MappedXattr::Value(disk.clone()),
            ),
            (
                b"security.capability",
                &cap_v3(0),
                MappedXattr::Value(cap_v3(100)),
                MappedXattr::Unmapped,
            ),
            (
                b"security.capability",
                &cap_v3(105),
                MappedXattr::Unmapped,
                MappedXattr::Value(cap_v3(5)),
            ),
            // Revision 2 means disk id 0; a capability for disk id 0 is stored as revision 2.
            (
                b"security.capability",
                &cap_v2(),
                MappedXattr::Value(cap_v3(100)),
                MappedXattr::Unmapped,
            ),
            (
                b"security.capability",
                &cap_v3(100),
                MappedXattr::Unmapped,
                MappedXattr::Value(cap_v2()),
            ),
            // Malformed capabilities, other names and malformed ACLs are left alone.
            (
                b"security.capability",
                &cap_v3(0)[..22],
                MappedXattr::Unchanged,
                MappedXattr::Unchanged,
            ),
            (
                b"user.note",
                &cap_v3(0),
                MappedXattr::Unchanged,
                MappedXattr::Unchanged,
            ),
            (
                b"system.posix_acl_access",
                &[2, 0, 0, 0, 1],
                MappedXattr::Unchanged,
                MappedXattr::Unchanged,
            ),
        ];
        for (name, value, to_shown, to_disk) in cases {
            let what = String::from_utf8_lossy(name);
            assert_eq!(&v.xattr_to_shown(name, value), to_shown, "{what} to shown");
            assert_eq!(&v.xattr_to_disk(name, value), to_disk, "{what} to disk");
        }
        // No mapping: nothing to do, whatever the value.
        assert_eq!(
            IdView::default().xattr_to_disk(b"system.posix_acl_access", &shown),
            MappedXattr::Unchanged
        );
    }
}
