//! The merged view of one directory: which layer answers for each name.
//!
//! A [`DirIndex`] is built once per directory node from the listings of the layers that hold
//! the directory (top first) and then kept in step with every change layerfs makes in the upper.
//! It answers lookups without touching lower layers again, so the cost of a lookup does not
//! grow with the number of layers after the first one in a directory, and it is the source of
//! the readdir snapshot.
//!
//! Merge rules (kernel overlayfs): the topmost object of a name wins; a whiteout hides the name
//! in every layer below it but not in its own layer; a non-directory ends the stack below it;
//! directories of the same name merge down to the first opaque one; the upper never hides its
//! own entries. This module is pure: listings come in, decisions come out.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::sys::DT_DIR;

/// What one layer holds under one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A real object with this `d_type` and `d_ino` (the inode number `getdents` gives).
    Real(u8, u64),
    /// A whiteout (any dialect).
    Whiteout,
}

/// The listing of one layer's copy of the directory, already classified.
#[derive(Debug, Default)]
pub struct LayerListing {
    pub layer: u16,
    /// Entries of the layer: real ones and whiteouts. A name with both a real entry and a
    /// whiteout in the same layer must be given as `Real` only (whiteouts act on lower layers).
    pub entries: Vec<(Box<[u8]>, Found)>,
}

/// Where a visible name lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Top {
    pub layer: u16,
    pub dtype: u8,
    /// The inode number the layer's listing gave (meaningful for lower layers: plain readdir
    /// reports it without a stat).
    pub dino: u64,
}

impl Top {
    pub fn is_dir(&self) -> bool {
        self.dtype == DT_DIR
    }
}

/// Everything the union needs to know about one name of a directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    /// The object shown under this name; `None` when whited out.
    pub top: Option<Top>,
    /// For a visible directory: the layers holding a directory of this name, top first, down to
    /// the first layer where the name is a non-directory or a whiteout. Opaque markers of the
    /// child itself are applied when the child's own index is built. (A boxed slice: most
    /// entries are files and hold none; indexes of big trees are mostly these entries.)
    pub dir_layers: Box<[u16]>,
    /// The upper holds a whiteout (or other marker) for this name that creation must replace.
    pub upper_whiteout: bool,
    /// Removing the upper object would uncover something from a lower layer, so removal must
    /// leave a whiteout.
    pub lower_visible: bool,
}

#[derive(Default)]
struct Pending {
    entry: IndexEntry,
    dir_layers: Vec<u16>,
    closed: bool,
    seen_lower: bool,
}

/// Incremental construction of a [`DirIndex`]: add layers top first, stop after an opaque one.
pub struct IndexBuilder {
    upper: Option<u16>,
    names: HashMap<Box<[u8]>, Pending>,
}

impl IndexBuilder {
    /// `upper` is the layer number of the writable layer, if the stack has one.
    pub fn new(upper: Option<u16>) -> Self {
        IndexBuilder {
            upper,
            names: HashMap::new(),
        }
    }

    /// Merge the next layer down.
    pub fn add_layer(&mut self, listing: LayerListing) {
        let is_upper = Some(listing.layer) == self.upper;
        for (name, found) in listing.entries {
            match self.names.get_mut(&name) {
                None => {
                    let mut p = Pending::default();
                    match found {
                        Found::Real(dtype, dino) => {
                            p.entry.top = Some(Top {
                                layer: listing.layer,
                                dtype,
                                dino,
                            });
                            if dtype == DT_DIR {
                                p.dir_layers.push(listing.layer);
                            } else {
                                p.closed = true;
                            }
                            if !is_upper {
                                p.seen_lower = true;
                                p.entry.lower_visible = true;
                            }
                        }
                        Found::Whiteout => {
                            p.closed = true;
                            if is_upper {
                                p.entry.upper_whiteout = true;
                            } else {
                                p.seen_lower = true;
                            }
                        }
                    }
                    self.names.insert(name, p);
                }
                Some(p) => {
                    if !p.seen_lower && !is_upper {
                        p.seen_lower = true;
                        p.entry.lower_visible = matches!(found, Found::Real(..));
                    }
                    if !p.closed {
                        match found {
                            Found::Real(DT_DIR, _) => p.dir_layers.push(listing.layer),
                            _ => p.closed = true,
                        }
                    }
                }
            }
        }
    }

    pub fn finish(self) -> DirIndex {
        let entries = self
            .names
            .into_iter()
            .filter(|(_, p)| p.entry.top.is_some() || p.entry.upper_whiteout)
            .map(|(n, mut p)| {
                p.entry.dir_layers = p.dir_layers.into_boxed_slice();
                (n, p.entry)
            })
            .collect();
        DirIndex {
            upper: self.upper,
            entries,
            sorted: None,
        }
    }
}

/// The merged directory.
#[derive(Debug)]
pub struct DirIndex {
    upper: Option<u16>,
    entries: HashMap<Box<[u8]>, IndexEntry>,
    /// The visible entries in readdir order, built when a listing starts and dropped when it
    /// ends or the directory changes.
    sorted: Option<Arc<Vec<Listed>>>,
}

/// One visible entry in readdir order.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The entry's readdir offset: a hash of its name, so offsets stay valid across calls
    /// and changes (as with ext4's hash-ordered directories) and no per-open state is needed.
    pub offset: u64,
    pub name: Box<[u8]>,
    pub top: Top,
}

/// First offset a name can have: 1 and 2 are `.` and `..`.
pub const FIRST_NAME_OFFSET: u64 = 3;

/// The readdir offset of a name: a 63-bit hash (a positive `off_t`, as telldir needs) of at
/// least [`FIRST_NAME_OFFSET`]. Deterministic for the life of the process.
pub fn name_offset(name: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() >> 1).max(FIRST_NAME_OFFSET)
}

impl DirIndex {
    /// The entry for `name`, visible or not.
    pub fn get(&self, name: &[u8]) -> Option<&IndexEntry> {
        self.entries.get(name)
    }

    /// The visible object under `name`.
    pub fn visible(&self, name: &[u8]) -> Option<(Top, &[u16])> {
        let e = self.entries.get(name)?;
        e.top.map(|t| (t, &*e.dir_layers))
    }

    /// Visible names with where they live, sorted bytewise (the readdir order).
    pub fn listing(&self) -> Vec<(Box<[u8]>, Top)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter_map(|(n, e)| e.top.map(|t| (n.clone(), t)))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Visible entries in readdir (offset) order, offsets unique. Kept until the listing ends
    /// or the directory changes.
    pub fn sorted(&mut self) -> Arc<Vec<Listed>> {
        if let Some(s) = &self.sorted {
            return s.clone();
        }
        let mut v: Vec<Listed> = self
            .entries
            .iter()
            .filter_map(|(n, e)| {
                e.top.map(|top| Listed {
                    offset: name_offset(n),
                    name: n.clone(),
                    top,
                })
            })
            .collect();
        v.sort_unstable_by(|a, b| a.offset.cmp(&b.offset).then_with(|| a.name.cmp(&b.name)));
        // Names whose hashes collide take the next free offsets, so every offset names one
        // entry and resuming after it skips nothing.
        for i in 1..v.len() {
            if v[i].offset <= v[i - 1].offset {
                v[i].offset = v[i - 1].offset + 1;
            }
        }
        let v = Arc::new(v);
        self.sorted = Some(v.clone());
        v
    }

    /// Forget the readdir order (a listing reached its end).
    pub fn drop_sorted(&mut self) {
        self.sorted = None;
    }

    /// True when no name is visible (what `rmdir` requires).
    pub fn is_empty(&self) -> bool {
        self.entries.values().all(|e| e.top.is_none())
    }

    /// Names the upper holds whiteouts for (to clean when the directory is removed).
    pub fn upper_whiteouts(&self) -> impl Iterator<Item = &[u8]> {
        self.entries
            .iter()
            .filter(|(_, e)| e.upper_whiteout)
            .map(|(n, _)| &**n)
    }

    /// A new object was created in the upper under `name` (over a whiteout or not).
    pub fn created(&mut self, name: &[u8], dtype: u8) {
        self.sorted = None;
        let Some(upper) = self.upper else { return };
        let e = self.entries.entry(name.into()).or_default();
        e.top = Some(Top {
            layer: upper,
            dtype,
            dino: 0,
        });
        e.upper_whiteout = false;
        e.dir_layers = if dtype == DT_DIR {
            Box::new([upper])
        } else {
            Box::new([])
        };
    }

    /// The visible lower object under `name` now also exists in the upper (copy-up).
    pub fn copied_up(&mut self, name: &[u8]) {
        self.sorted = None;
        let Some(upper) = self.upper else { return };
        if let Some(e) = self.entries.get_mut(name) {
            if let Some(top) = e.top.as_mut() {
                if top.layer != upper {
                    top.layer = upper;
                    if top.dtype == DT_DIR {
                        let mut v = Vec::with_capacity(e.dir_layers.len() + 1);
                        v.push(upper);
                        v.extend_from_slice(&e.dir_layers);
                        e.dir_layers = v.into_boxed_slice();
                    }
                }
            }
        }
    }

    /// The upper directory `name` was made opaque: nothing below it merges any more.
    pub fn made_opaque(&mut self, name: &[u8]) {
        self.sorted = None;
        if let Some(e) = self.entries.get_mut(name) {
            e.dir_layers = e.dir_layers.iter().take(1).copied().collect();
        }
    }

    /// `name` was removed from the view. Returns whether a whiteout must be (and was assumed
    /// to be) left in the upper.
    pub fn removed(&mut self, name: &[u8]) -> bool {
        self.sorted = None;
        match self.entries.get_mut(name) {
            Some(e) if e.lower_visible => {
                e.top = None;
                e.dir_layers = Box::new([]);
                e.upper_whiteout = true;
                true
            }
            Some(_) => {
                self.entries.remove(name);
                false
            }
            None => false,
        }
    }

    /// Whether removing `name` needs a whiteout in the upper.
    pub fn needs_whiteout(&self, name: &[u8]) -> bool {
        self.entries.get(name).is_some_and(|e| e.lower_visible)
    }

    /// Number of names held (visible or whited out): what the index costs in memory.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of visible entries.
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| e.top.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{DT_CHR, DT_LNK, DT_REG};

    fn listing(layer: u16, entries: &[(&str, Found)]) -> LayerListing {
        LayerListing {
            layer,
            entries: entries
                .iter()
                .map(|(n, f)| (n.as_bytes().into(), *f))
                .collect(),
        }
    }

    fn build(upper: Option<u16>, layers: Vec<LayerListing>) -> DirIndex {
        let mut b = IndexBuilder::new(upper);
        for l in layers {
            b.add_layer(l);
        }
        b.finish()
    }

    const F: Found = Found::Real(DT_REG, 0);
    const D: Found = Found::Real(DT_DIR, 0);
    const W: Found = Found::Whiteout;

    fn vis<'a>(idx: &'a DirIndex, name: &[u8]) -> (Top, &'a [u16]) {
        match idx.visible(name) {
            Some(v) => v,
            None => panic!("{} not visible", name.escape_ascii()),
        }
    }

    fn ent<'a>(idx: &'a DirIndex, name: &[u8]) -> &'a IndexEntry {
        match idx.get(name) {
            Some(e) => e,
            None => panic!("{} not indexed", name.escape_ascii()),
        }
    }

    fn names(idx: &DirIndex) -> Vec<String> {
        idx.listing()
            .into_iter()
            .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
            .collect()
    }

    #[test]
    fn upper_wins_and_whiteout_hides_lower() {
        let idx = build(
            Some(0),
            vec![
                listing(0, &[("a", F), ("gone", W)]),
                listing(1, &[("a", D), ("gone", F), ("b", F)]),
            ],
        );
        assert_eq!(names(&idx), ["a", "b"]);
        assert_eq!(
            vis(&idx, b"a").0,
            Top {
                layer: 0,
                dtype: DT_REG,
                dino: 0
            }
        );
        assert!(ent(&idx, b"gone").upper_whiteout);
        assert!(ent(&idx, b"a").lower_visible);
        assert!(!idx.needs_whiteout(b"nope"));
    }

    #[test]
    fn whiteout_does_not_hide_its_own_layer_but_hides_lower() {
        // A lower layer that deleted and recreated a name lists it as Real only; a whiteout in
        // layer 1 hides layer 2's entry.
        let idx = build(
            None,
            vec![listing(1, &[("x", W)]), listing(2, &[("x", F), ("y", F)])],
        );
        assert_eq!(names(&idx), ["y"]);
        assert!(idx.get(b"x").is_none());
    }

    #[test]
    fn dirs_merge_until_non_dir_or_whiteout() {
        let idx = build(
            None,
            vec![
                listing(1, &[("d", D), ("e", D)]),
                listing(2, &[("d", D), ("e", F)]),
                listing(3, &[("d", W), ("e", D)]),
                listing(4, &[("d", D)]),
            ],
        );
        assert_eq!(vis(&idx, b"d").1, &[1, 2]);
        assert_eq!(vis(&idx, b"e").1, &[1]);
    }

    #[test]
    fn non_dir_on_top_hides_lower_dir() {
        let idx = build(
            None,
            vec![
                listing(1, &[("l", Found::Real(DT_LNK, 0))]),
                listing(2, &[("l", D)]),
            ],
        );
        assert_eq!(vis(&idx, b"l").0.dtype, DT_LNK);
        assert!(vis(&idx, b"l").1.is_empty());
    }

    #[test]
    fn removal_leaves_whiteout_only_when_lower_visible() {
        let mut idx = build(
            Some(0),
            vec![
                listing(0, &[("new", F), ("both", F)]),
                listing(1, &[("both", F), ("low", Found::Real(DT_CHR, 0))]),
            ],
        );
        assert!(!idx.removed(b"new"));
        assert!(idx.get(b"new").is_none());
        assert!(idx.removed(b"both"));
        assert!(ent(&idx, b"both").upper_whiteout);
        assert!(idx.removed(b"low"));
        assert_eq!(names(&idx), Vec::<String>::new());
        assert!(idx.is_empty());
        let mut wh: Vec<_> = idx.upper_whiteouts().map(<[u8]>::to_vec).collect();
        wh.sort();
        assert_eq!(wh, [b"both".to_vec(), b"low".to_vec()]);
        // Recreating over a whiteout clears it and keeps the lower knowledge.
        idx.created(b"both", DT_DIR);
        let e = ent(&idx, b"both");
        assert!(!e.upper_whiteout && e.lower_visible);
        assert_eq!(&*e.dir_layers, [0]);
    }

    #[test]
    fn lower_whiteout_below_upper_entry_means_nothing_to_uncover() {
        let idx = build(
            Some(0),
            vec![
                listing(0, &[("n", F)]),
                listing(1, &[("n", W)]),
                listing(2, &[("n", F)]),
            ],
        );
        assert!(!idx.needs_whiteout(b"n"));
    }

    #[test]
    fn copy_up_of_dir_prepends_upper() {
        let mut idx = build(
            Some(0),
            vec![
                listing(0, &[]),
                listing(1, &[("d", D)]),
                listing(2, &[("d", D)]),
            ],
        );
        idx.copied_up(b"d");
        assert_eq!(
            vis(&idx, b"d"),
            (
                Top {
                    layer: 0,
                    dtype: DT_DIR,
                    dino: 0
                },
                &[0u16, 1, 2][..]
            )
        );
        idx.made_opaque(b"d");
        assert_eq!(vis(&idx, b"d").1, &[0]);
    }

    #[test]
    fn readdir_order_is_by_stable_name_offsets() {
        let mut idx = build(Some(0), vec![listing(1, &[("b", F), ("a", F), ("c", D)])]);
        let first = idx.sorted();
        assert_eq!(first.len(), 3);
        assert!(first.windows(2).all(|w| w[0].offset <= w[1].offset));
        assert!(
            first
                .iter()
                .all(|e| e.offset >= FIRST_NAME_OFFSET && e.offset <= i64::MAX as u64)
        );
        // An entry keeps its offset whatever else changes in the directory.
        let b = name_offset(b"b");
        idx.removed(b"a");
        idx.created(b"zz", DT_REG);
        let again = idx.sorted();
        assert_eq!(
            again.iter().find(|e| &*e.name == b"b").map(|e| e.offset),
            Some(b)
        );
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn listing_is_sorted_bytewise_and_counts() {
        let idx = build(
            None,
            vec![listing(1, &[("b", F), ("a", F), ("\u{e9}", F), ("B", F)])],
        );
        assert_eq!(names(&idx), ["B", "a", "b", "\u{e9}"]);
        assert_eq!(idx.len(), 4);
    }
}
