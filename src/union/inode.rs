//! Inode table: the union's nodes, their names, their numbers and their lifetimes.
//!
//! Invariants:
//! * A node is identified by the object that backs it (`Backing`: device and inode number of
//!   the topmost copy). Hard links in one layer therefore share a node, and so an inode number.
//! * Inode numbers are stable: a node's number comes from its origin object (the lower object
//!   a copy-up came from, recorded in the upper) mapped per device ([`InoMap`]), so it survives
//!   copy-up, forget/lookup and remount. Only if that number is already taken by a different
//!   live object does a node get a number from a fallback counter.
//! * Every name the kernel knows (a "dentry": parent + name) maps to one node; a node keeps
//!   the list of its known names. The first one is used to build the node's path.
//! * A node stays in the table while the kernel holds lookups on it or it has children in the
//!   table (so paths can always be built). Root (inode 1) is never removed.
//! * Nothing here does I/O: the table is changed under a short mutex.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, Weak};

use super::dirindex::DirIndex;

/// The FUSE root inode number.
pub const ROOT_INO: u64 = 1;

/// Identity of the object backing a node: `(st_dev, st_ino)` of its topmost copy.
pub type Backing = (u64, u64);

/// A lower layer and a directory's path in it.
pub type LowerPath = (u16, Box<[u8]>);

/// Mutable state of a node, kept behind the node's own mutex.
#[derive(Debug)]
pub struct NodeState {
    /// `S_IFMT` bits of the object.
    pub kind: u32,
    /// Topmost layer holding the object.
    pub layer: u16,
    /// Directories: every layer merged into this directory, top first, opaque markers applied.
    pub merge: Box<[u16]>,
    /// `merge` has had opaque markers applied (it may be longer than the real stack until the
    /// directory's index is built).
    pub merge_cut: bool,
    /// The object backing the node now.
    pub backing: Backing,
    /// Directories: the merged listing, built on first use.
    pub index: Option<Box<DirIndex>>,
    /// All names are gone (unlinked or rmdir'ed) but the kernel still references the node.
    pub unlinked: bool,
    /// Once unlinked: an `O_PATH` descriptor of the object, so `fstat` and reopening still
    /// reach it (the kernel keeps using the inode while a file is open or a fifo in use).
    pub orphan: Option<Arc<std::os::fd::OwnedFd>>,
    /// The object is known to carry no user-visible xattr: `getxattr` answers ENODATA
    /// without a system call (`ls -l` asks for `security.selinux` on every file).
    pub no_xattrs: bool,
    /// The object is known to carry no `security.capability`: the kernel asks for it before
    /// the first write through every open (the killpriv check), and new files never have it.
    pub no_caps: bool,
    /// Bumped by every xattr change: a miss is remembered (`no_xattrs`, `no_caps`) only if no
    /// change ran while it was looked up, or a capability set meanwhile could stay hidden.
    pub xattr_epoch: u32,
    /// When the index was last used (for dropping the least used indexes).
    pub index_stamp: u64,
    /// Directories whose lower copies are not at their parent's lower paths plus their name
    /// (a redirect was followed, or the directory was renamed with one): the path of each
    /// lower layer's copy. Lower paths of other nodes follow from their nearest ancestor that
    /// has these (see `Union::lpath`). The upper copy is always at the union path.
    pub lpaths: Option<Box<[LowerPath]>>,
    /// A metacopy file of the upper: where its data is (see [`super::metacopy`]).
    pub data: Option<Box<super::metacopy::DataSource>>,
}

/// One union inode.
#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    pub state: Mutex<NodeState>,
    /// Held while the node is being copied up so two requests never copy it twice.
    pub copy_up: Mutex<()>,
    /// Bumped each time the node's backing object changes (copy-up), so descriptors opened
    /// on the old object know to reopen.
    pub generation: AtomicU64,
    /// The kernel's registration of the node's file for FUSE passthrough, once there is one.
    pub passthrough: Mutex<Option<Box<PassthroughSlot>>>,
    /// Open handles served through the FUSE page cache. While passthrough is on it changes
    /// only with `passthrough` locked: the kernel fails (EIO) an open that would mix
    /// page-cache and passthrough opens of one inode, so the open path chooses between them
    /// under that lock.
    pub cached_opens: AtomicU32,
    /// For a lower file: whether it is small enough to be read through the page cache
    /// ([`SMALL_UNKNOWN`], [`SMALL_YES`], [`SMALL_STORED`], [`SMALL_NO`]). Lower files never
    /// change.
    pub small_lower: AtomicU8,
}

/// [`Node::small_lower`] not asked yet.
pub const SMALL_UNKNOWN: u8 = 0;
/// [`Node::small_lower`]: at most the size limit.
pub const SMALL_YES: u8 = 1;
/// [`Node::small_lower`]: larger than the size limit.
pub const SMALL_NO: u8 = 2;
/// [`Node::small_lower`]: small, and its content was handed to the kernel's page cache.
pub const SMALL_STORED: u8 = 3;

/// A node's backing-file registration with the kernel (FUSE passthrough). The FUSE layer
/// owns what goes in; the union only ties its lifetime to the node's, so the registration
/// type stays opaque here.
#[derive(Debug)]
pub struct PassthroughSlot {
    /// The node generation the registered file belongs to.
    pub generation: u64,
    /// The registration, alive while an open handle or `kept` holds it. The kernel takes
    /// one registration per inode at a time, so every open of the node shares this one.
    pub live: Weak<dyn Any + Send + Sync>,
    /// Held past the last close, so a re-open needs no system call. It goes with the node,
    /// when the kernel forgets the inode. Until then an unlinked node holds its object anyway
    /// (the descriptor kept at unlink), so keeping it holds no space an unlink through the
    /// mount would free. Kernel overlayfs, likewise, holds the real objects of every cached
    /// inode.
    pub kept: Option<Arc<dyn Any + Send + Sync>>,
}

impl Node {
    pub fn new(ino: u64, state: NodeState) -> Arc<Node> {
        Arc::new(Node {
            ino,
            state: Mutex::new(state),
            copy_up: Mutex::new(()),
            generation: AtomicU64::new(0),
            passthrough: Mutex::new(None),
            cached_opens: AtomicU32::new(0),
            small_lower: AtomicU8::new(SMALL_UNKNOWN),
        })
    }

    /// Lock the node's passthrough registration (poison ignored, as for the state).
    pub fn passthrough_slot(&self) -> std::sync::MutexGuard<'_, Option<Box<PassthroughSlot>>> {
        self.passthrough.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock the node state. A poisoned lock (a panic elsewhere) still yields the state: the
    /// state is plain data that every writer leaves consistent before it can panic.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
struct Entry {
    node: Arc<Node>,
    nlookup: u64,
    /// Number of dentries (in `dentries`) whose parent is this node.
    children: u64,
    /// Known names of this node, the first one used for paths.
    links: Vec<(u64, Box<[u8]>)>,
    backing: Backing,
}

/// Maps object identities to stable inode numbers.
#[derive(Debug, Default)]
pub struct InoMap {
    /// Devices seen, in first-seen order (layer roots are registered first, upper first).
    devs: Vec<u64>,
}

/// Fallback numbers live above every mapped number.
const FALLBACK_BASE: u64 = 1 << 62;
const DEV_SHIFT: u32 = 48;

impl InoMap {
    pub fn register(&mut self, dev: u64) -> usize {
        if let Some(i) = self.devs.iter().position(|&d| d == dev) {
            return i;
        }
        self.devs.push(dev);
        self.devs.len() - 1
    }

    /// The stable number for an object, if it fits the scheme: objects on the first device
    /// keep their own inode number (as kernel overlayfs does when all layers share a
    /// filesystem); other devices get their index in the top bits.
    pub fn map(&mut self, dev: u64, ino: u64) -> Option<u64> {
        let idx = self.register(dev) as u64;
        if ino >= 1 << DEV_SHIFT || idx >= (FALLBACK_BASE >> DEV_SHIFT) {
            return None;
        }
        let n = ino | (idx << DEV_SHIFT);
        (n > ROOT_INO).then_some(n)
    }
}

/// All nodes the kernel currently knows.
#[derive(Debug)]
pub struct Table {
    entries: HashMap<u64, Entry>,
    by_backing: HashMap<Backing, u64>,
    dentries: HashMap<(u64, Box<[u8]>), u64>,
    next_fallback: u64,
    pub inos: InoMap,
}

/// Longest parent chain followed when building a path (a guard against table corruption).
const MAX_DEPTH: usize = 4096;

impl Table {
    pub fn new(root: Arc<Node>, root_backing: Backing) -> Self {
        let mut entries = HashMap::new();
        entries.insert(
            ROOT_INO,
            Entry {
                node: root,
                nlookup: 1,
                children: 0,
                links: Vec::new(),
                backing: root_backing,
            },
        );
        Table {
            entries,
            by_backing: HashMap::new(),
            dentries: HashMap::new(),
            next_fallback: FALLBACK_BASE,
            inos: InoMap::default(),
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Arc<Node>> {
        self.entries.get(&ino).map(|e| &e.node)
    }

    /// The node known under `parent`/`name`, if any.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.dentries.get(&(parent, name.into())).copied()
    }

    /// Path of a node relative to the layer roots (`a/b/c`; empty for the root). `None` when
    /// the node has no known name any more.
    pub fn path(&self, ino: u64) -> Option<Vec<u8>> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let e = self.entries.get(&cur)?;
            let (parent, name) = e.links.first()?;
            parts.push(name);
            cur = *parent;
            if parts.len() > MAX_DEPTH {
                return None;
            }
        }
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in parts.iter().rev() {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        Some(out)
    }

    /// The parent and name of a node's primary name.
    pub fn first_link(&self, ino: u64) -> Option<(u64, &[u8])> {
        self.entries
            .get(&ino)?
            .links
            .first()
            .map(|(p, n)| (*p, &**n))
    }

    /// The parent of a node's primary name.
    pub fn parent(&self, ino: u64) -> Option<u64> {
        self.entries.get(&ino)?.links.first().map(|(p, _)| *p)
    }

    /// Find the node for `backing` (known under `parent`/`name`) or make one with `make`,
    /// and count one kernel lookup on it. `preferred` is the stable number to use.
    pub fn lookup(
        &mut self,
        parent: u64,
        name: &[u8],
        backing: Backing,
        preferred: Option<u64>,
        make: impl FnOnce(u64) -> Arc<Node>,
    ) -> Arc<Node> {
        let node = match self
            .by_backing
            .get(&backing)
            .and_then(|i| self.entries.get(i))
        {
            Some(e) => e.node.clone(),
            None => {
                let ino = match preferred {
                    Some(p) if !self.entries.contains_key(&p) => p,
                    _ => {
                        self.next_fallback += 1;
                        self.next_fallback
                    }
                };
                let node = make(ino);
                self.entries.insert(
                    ino,
                    Entry {
                        node: node.clone(),
                        nlookup: 0,
                        children: 0,
                        links: Vec::new(),
                        backing,
                    },
                );
                self.by_backing.insert(backing, ino);
                node
            }
        };
        self.add_link(node.ino, parent, name);
        self.add_lookup(node.ino);
        node
    }

    /// Record that `ino` is (also) known as `parent`/`name`, replacing whatever was known there.
    pub fn add_link(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, Box::<[u8]>::from(name));
        match self.dentries.get(&key) {
            Some(&old) if old == ino => return,
            Some(&old) => self.drop_link(old, parent, name),
            None => {}
        }
        self.dentries.insert(key, ino);
        if let Some(e) = self.entries.get_mut(&ino) {
            // Nearly every node has exactly one name: no room for more until needed.
            e.links.reserve_exact(1);
            e.links.push((parent, name.into()));
        }
        if let Some(p) = self.entries.get_mut(&parent) {
            p.children += 1;
        }
    }

    /// Forget the name `parent`/`name` (after unlink, rmdir, or when renamed over). Returns the
    /// node that was known there.
    pub fn remove_link(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = self.dentries.get(&(parent, name.into())).copied()?;
        self.drop_link(ino, parent, name);
        self.try_evict(ino);
        Some(ino)
    }

    fn drop_link(&mut self, ino: u64, parent: u64, name: &[u8]) {
        self.dentries.remove(&(parent, name.into()));
        if let Some(e) = self.entries.get_mut(&ino) {
            e.links.retain(|(p, n)| !(*p == parent && &**n == name));
        }
        if let Some(p) = self.entries.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.try_evict(parent);
    }

    /// Whether the node has any known name left.
    pub fn has_links(&self, ino: u64) -> bool {
        ino == ROOT_INO || self.entries.get(&ino).is_some_and(|e| !e.links.is_empty())
    }

    /// Move a name: `old_parent`/`old_name` is now `new_parent`/`new_name`. Whatever was known
    /// at the new name is dropped first (the caller has dealt with the replaced object).
    pub fn rename(
        &mut self,
        ino: u64,
        old_parent: u64,
        old_name: &[u8],
        new_parent: u64,
        new_name: &[u8],
    ) {
        // Keep the renamed node pinned while its old link goes away.
        if let Some(e) = self.entries.get_mut(&ino) {
            e.children += 1;
        }
        self.dentries.remove(&(old_parent, old_name.into()));
        if let Some(p) = self.entries.get_mut(&old_parent) {
            p.children = p.children.saturating_sub(1);
        }
        if let Some(e) = self.entries.get_mut(&ino) {
            match e
                .links
                .iter()
                .position(|(p, n)| *p == old_parent && &**n == old_name)
            {
                // Keep the position so a renamed primary name stays primary.
                Some(i) => {
                    e.links[i] = (new_parent, new_name.into());
                }
                None => e.links.push((new_parent, new_name.into())),
            }
        }
        if let Some(&old) = self.dentries.get(&(new_parent, new_name.into())) {
            if old != ino {
                self.drop_link(old, new_parent, new_name);
                self.try_evict(old);
            }
        }
        self.dentries.insert((new_parent, new_name.into()), ino);
        if let Some(p) = self.entries.get_mut(&new_parent) {
            p.children += 1;
        }
        if let Some(e) = self.entries.get_mut(&ino) {
            e.children -= 1;
        }
        self.try_evict(old_parent);
        self.try_evict(ino);
    }

    /// Exchange two names (`RENAME_EXCHANGE`).
    pub fn exchange(&mut self, a: (u64, &[u8]), b: (u64, &[u8])) {
        let ia = self.dentries.get(&(a.0, a.1.into())).copied();
        let ib = self.dentries.get(&(b.0, b.1.into())).copied();
        let relabel = |t: &mut Table, ino: u64, from: (u64, &[u8]), to: (u64, &[u8])| {
            if let Some(e) = t.entries.get_mut(&ino) {
                if let Some(l) = e
                    .links
                    .iter_mut()
                    .find(|(p, n)| *p == from.0 && &**n == from.1)
                {
                    *l = (to.0, to.1.into());
                }
            }
        };
        if let Some(i) = ia {
            relabel(self, i, a, b);
        }
        if let Some(i) = ib {
            relabel(self, i, b, a);
        }
        self.dentries.remove(&(a.0, a.1.into()));
        self.dentries.remove(&(b.0, b.1.into()));
        let mut delta: HashMap<u64, i64> = HashMap::new();
        if let Some(i) = ia {
            self.dentries.insert((b.0, b.1.into()), i);
            *delta.entry(a.0).or_default() -= 1;
            *delta.entry(b.0).or_default() += 1;
        }
        if let Some(i) = ib {
            self.dentries.insert((a.0, a.1.into()), i);
            *delta.entry(b.0).or_default() -= 1;
            *delta.entry(a.0).or_default() += 1;
        }
        for (p, d) in delta {
            if let Some(e) = self.entries.get_mut(&p) {
                e.children = (e.children as i64 + d).max(0) as u64;
            }
        }
        self.try_evict(a.0);
        self.try_evict(b.0);
    }

    /// The object backing a node changed (copy-up): future lookups of the new object find it.
    pub fn rebind(&mut self, ino: u64, backing: Backing) {
        let Some(e) = self.entries.get_mut(&ino) else {
            return;
        };
        let old = std::mem::replace(&mut e.backing, backing);
        if self.by_backing.get(&old) == Some(&ino) {
            self.by_backing.remove(&old);
        }
        self.by_backing.insert(backing, ino);
    }

    /// The object is gone for good (last link removed): a new object reusing its device inode
    /// number must not be mistaken for it.
    pub fn unbind(&mut self, ino: u64) {
        if let Some(e) = self.entries.get(&ino) {
            if self.by_backing.get(&e.backing) == Some(&ino) {
                self.by_backing.remove(&e.backing);
            }
        }
    }

    /// Count one more kernel reference (entries returned by create/mkdir/link/readdirplus).
    pub fn add_lookup(&mut self, ino: u64) {
        if let Some(e) = self.entries.get_mut(&ino) {
            e.nlookup += 1;
        }
    }

    /// The kernel dropped `n` references.
    /// Drop `n` kernel references to `ino`; returns how many nodes were freed.
    pub fn forget(&mut self, ino: u64, n: u64) -> usize {
        if ino == ROOT_INO {
            return 0;
        }
        if let Some(e) = self.entries.get_mut(&ino) {
            e.nlookup = e.nlookup.saturating_sub(n);
        }
        self.try_evict(ino)
    }

    /// Free `ino` if nothing holds it, then its parents that it held; returns how many
    /// nodes were freed.
    fn try_evict(&mut self, ino: u64) -> usize {
        let mut freed = 0;
        let mut stack = vec![ino];
        while let Some(ino) = stack.pop() {
            if ino == ROOT_INO {
                continue;
            }
            let Some(e) = self.entries.get(&ino) else {
                continue;
            };
            if e.nlookup > 0 || e.children > 0 {
                continue;
            }
            let Some(e) = self.entries.remove(&ino) else {
                continue;
            };
            freed += 1;
            if self.by_backing.get(&e.backing) == Some(&ino) {
                self.by_backing.remove(&e.backing);
            }
            for (parent, name) in e.links {
                self.dentries.remove(&(parent, name));
                if let Some(p) = self.entries.get_mut(&parent) {
                    p.children = p.children.saturating_sub(1);
                    stack.push(parent);
                }
            }
        }
        freed
    }

    /// Number of nodes held (for tests and memory checks).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true: the root is always held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState {
            kind: crate::sys::S_IFDIR,
            layer: 0,
            merge: Box::new([0]),
            merge_cut: true,
            backing: (0, 0),
            index: None,
            unlinked: false,
            orphan: None,
            no_xattrs: false,
            no_caps: false,
            xattr_epoch: 0,
            index_stamp: 0,
            lpaths: None,
            data: None,
        }
    }

    fn table() -> Table {
        Table::new(Node::new(ROOT_INO, state()), (9, 2))
    }

    fn look(
        t: &mut Table,
        parent: u64,
        name: &str,
        backing: Backing,
        preferred: Option<u64>,
    ) -> u64 {
        t.lookup(parent, name.as_bytes(), backing, preferred, |ino| {
            Node::new(ino, state())
        })
        .ino
    }

    #[test]
    fn paths_and_eviction_cascade() {
        let mut t = table();
        let a = look(&mut t, ROOT_INO, "a", (1, 10), Some(10));
        let b = look(&mut t, a, "b", (1, 11), Some(11));
        let c = look(&mut t, b, "c\u{e9}", (1, 12), Some(12));
        assert_eq!(t.path(c).as_deref(), Some("a/b/c\u{e9}".as_bytes()));
        assert_eq!(t.path(ROOT_INO).as_deref(), Some(&b""[..]));
        // Parents stay while a child is referenced; the last forget frees all three.
        assert_eq!(t.forget(a, 1), 0);
        assert_eq!(t.forget(b, 1), 0);
        assert_eq!(t.len(), 4);
        assert_eq!(t.forget(c, 1), 3);
        assert_eq!(t.len(), 1);
        assert_eq!(t.forget(c, 1), 0, "already gone");
    }

    #[test]
    fn hard_links_share_a_node() {
        let mut t = table();
        let x = look(&mut t, ROOT_INO, "x", (1, 50), Some(50));
        let y = look(&mut t, ROOT_INO, "y", (1, 50), Some(50));
        assert_eq!(x, y);
        assert_eq!(t.remove_link(ROOT_INO, b"x"), Some(x));
        assert_eq!(t.path(x).as_deref(), Some(&b"y"[..]));
        t.remove_link(ROOT_INO, b"y");
        assert!(!t.has_links(x));
        assert!(t.get(x).is_some(), "still referenced by the kernel");
        t.forget(x, 2);
        assert!(t.get(x).is_none());
    }

    #[test]
    fn taken_number_falls_back() {
        let mut t = table();
        let a = look(&mut t, ROOT_INO, "a", (1, 10), Some(10));
        let b = look(&mut t, ROOT_INO, "b", (2, 10), Some(10));
        assert_eq!(a, 10);
        assert!(b > FALLBACK_BASE);
        // Root's number is never handed out.
        let c = look(&mut t, ROOT_INO, "c", (1, 1), Some(1));
        assert_ne!(c, ROOT_INO);
    }

    #[test]
    fn rename_moves_subtree_paths() {
        let mut t = table();
        let d = look(&mut t, ROOT_INO, "d", (1, 20), Some(20));
        let e = look(&mut t, ROOT_INO, "e", (1, 21), Some(21));
        let f = look(&mut t, d, "f", (1, 22), Some(22));
        t.rename(d, ROOT_INO, b"d", e, b"moved");
        assert_eq!(t.path(f).as_deref(), Some(&b"e/moved/f"[..]));
        assert_eq!(t.child(e, b"moved"), Some(d));
        assert_eq!(t.child(ROOT_INO, b"d"), None);
        // Renaming over a known name drops that node's name.
        let g = look(&mut t, ROOT_INO, "g", (1, 23), Some(23));
        t.rename(f, d, b"f", ROOT_INO, b"g");
        assert!(!t.has_links(g));
        assert_eq!(t.path(f).as_deref(), Some(&b"g"[..]));
        t.forget(g, 1);
        assert!(t.get(g).is_none());
    }

    #[test]
    fn exchange_swaps_names() {
        let mut t = table();
        let a = look(&mut t, ROOT_INO, "a", (1, 30), Some(30));
        let d = look(&mut t, ROOT_INO, "d", (1, 31), Some(31));
        let b = look(&mut t, d, "b", (1, 32), Some(32));
        t.exchange((ROOT_INO, b"a"), (d, b"b"));
        assert_eq!(t.path(a).as_deref(), Some(&b"d/b"[..]));
        assert_eq!(t.path(b).as_deref(), Some(&b"a"[..]));
        assert_eq!(t.child(ROOT_INO, b"a"), Some(b));
    }

    #[test]
    fn rebind_follows_copy_up() {
        let mut t = table();
        let a = look(&mut t, ROOT_INO, "a", (1, 40), Some(40));
        t.rebind(a, (7, 99));
        assert_eq!(look(&mut t, ROOT_INO, "a", (7, 99), Some(40)), a);
        t.unbind(a);
        let n = look(&mut t, ROOT_INO, "n", (7, 99), Some(99));
        assert_ne!(n, a);
    }

    #[test]
    fn ino_map_per_device() {
        let mut m = InoMap::default();
        assert_eq!(m.map(5, 100), Some(100));
        assert_eq!(m.map(6, 100), Some(100 | (1 << 48)));
        assert_eq!(m.map(5, 1 << 50), None);
        assert_eq!(m.map(5, 1), None);
    }
}
