//! The union through its library API, without FUSE: behaviour that needs more names than a
//! mount test should create, such as directory indexes dropped and rebuilt under the memory
//! budget.

use std::fs;
use std::path::Path;

use layerfs::union::{Caller, Listing, ROOT, SetAttr, Union, UnionConfig};
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

fn files(dir: &Path, n: usize) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        fs::File::create(dir.join(format!("f{i:05}"))).unwrap();
    }
}

/// A union of `root/low` under the upper `root/up` (work dir `root/work`).
fn writable_union(root: &Path) -> Union {
    let (up, work) = (root.join("up"), root.join("work"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    Union::new(&UnionConfig {
        lowers: vec![root.join("low")],
        upper: Some((up, work)),
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap()
}

fn names(u: &Union, ino: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let (entries, start) = u.read_dir(ino, offset).unwrap();
        let Some(e) = entries.get(start) else {
            return out;
        };
        out.push(e.name.to_vec());
        offset = e.offset;
    }
}

#[test]
fn indexes_dropped_under_the_budget_are_rebuilt_with_every_change() {
    let d = tempfile::tempdir().unwrap();
    // Four directories of 12,000 names: more than the indexes may hold together.
    for dir in ["a", "b", "c", "d"] {
        files(&d.path().join("low").join(dir), 12_000);
    }
    let u = writable_union(d.path());
    let a = u.lookup(ROOT, b"a").unwrap().ino;
    // Change `a` while its index is live...
    u.remove(a, b"f00000", false).unwrap();
    let caller = Caller::root();
    u.mkdir(a, b"new", 0o755, &caller).unwrap();
    // ...then read the others, which pushes `a`'s index out.
    for dir in [&b"b"[..], b"c", b"d"] {
        let ino = u.lookup(ROOT, dir).unwrap().ino;
        assert_eq!(names(&u, ino).len(), 12_000);
    }
    // Two 12,000-name directories and the root fit the budget; the older ones were dropped.
    assert!(
        u.index_names() <= 2 * 12_000 + 8,
        "held: {}",
        u.index_names()
    );
    // Rebuilt from the layers, `a` still shows exactly the changes.
    let listed = names(&u, a);
    assert_eq!(listed.len(), 12_000);
    assert!(listed.contains(&b"new".to_vec()));
    assert!(!listed.contains(&b"f00000".to_vec()));
    assert!(u.lookup(a, b"f00000").is_err());
    assert!(u.lookup(a, b"f11999").is_ok());
    // And further changes still land in a rebuilt index.
    u.remove(a, b"f11999", false).unwrap();
    assert!(u.lookup(a, b"f11999").is_err());
    assert_eq!(names(&u, a).len(), 11_999);
}

#[test]
fn a_listing_is_looked_up_in_one_batch_across_layers() {
    let d = tempfile::tempdir().unwrap();
    let (low, mid) = (d.path().join("low"), d.path().join("mid"));
    files(&low.join("dir"), 3);
    fs::create_dir_all(low.join("dir/sub")).unwrap();
    fs::create_dir_all(mid.join("dir")).unwrap();
    fs::write(mid.join("dir/f00001"), b"from mid").unwrap();
    let (up, work) = (d.path().join("up"), d.path().join("work"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    let u = Union::new(&UnionConfig {
        lowers: vec![mid, low],
        upper: Some((up, work)),
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap();
    let dir = u.lookup(ROOT, b"dir").unwrap().ino;
    let (entries, start) = u.read_dir(dir, 0).unwrap();
    // Removed after the listing was taken: skipped, as a concurrent unlink would make it.
    u.remove(dir, b"f00002", false).unwrap();
    let nodes_before = u.node_count();
    // Past the deadline, entries come by name only and no node is made.
    let mut names_only = Vec::new();
    u.lookup_listed(dir, &entries[start..], Some(Instant::now()), |e, found| {
        match found {
            Listing::Found(_) => panic!("{:?} looked up past the deadline", e.name),
            Listing::NameOnly(ino) => names_only.push((e.name.to_vec(), ino)),
        }
        true
    })
    .unwrap();
    assert_eq!(u.node_count(), nodes_before);
    names_only.sort();
    let mut seen = Vec::new();
    u.lookup_listed(dir, &entries[start..], None, |e, found| {
        let Listing::Found(attr) = found else {
            panic!("{:?} not looked up", e.name)
        };
        seen.push((e.name.to_vec(), attr.st.size));
        true
    })
    .unwrap();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (b"f00000".to_vec(), 0),
            (b"f00001".to_vec(), 8),
            (b"sub".to_vec(), seen[2].1)
        ]
    );
    assert_eq!(u.node_count(), nodes_before + 3);
    // Refusing an entry gives its reference back: once the first batch's references are
    // forgotten too, the nodes are gone again.
    let mut taken = Vec::new();
    u.lookup_listed(dir, &entries[start..], None, |_, found| {
        if let Listing::Found(attr) = found {
            taken.push(attr.ino);
        }
        taken.len() < 2
    })
    .unwrap();
    assert_eq!(taken.len(), 2);
    for (name, _) in &seen {
        let ino = u.lookup(dir, name).unwrap().ino;
        // Names-only entries carry the numbers a lookup gives.
        let listed = names_only.iter().find(|(n, _)| n == name).map(|e| e.1);
        assert_eq!(listed, Some(ino), "{name:?}");
        u.forget(ino, 2);
    }
    u.forget(taken[0], 1);
    assert_eq!(u.node_count(), nodes_before);
}

#[test]
fn warming_a_directory_builds_its_index_once() {
    let d = tempfile::tempdir().unwrap();
    files(&d.path().join("low/dir"), 50);
    let u = Union::new(&UnionConfig {
        lowers: vec![d.path().join("low")],
        upper: None,
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap();
    let dir = u.lookup(ROOT, b"dir").unwrap().ino;
    let before = u.index_names();
    assert!(u.warm_dir(dir, 10));
    assert_eq!(u.index_names(), before + 50);
    // Already there: nothing to do, and the listing is the same as without warming.
    assert!(!u.warm_dir(dir, 10));
    assert_eq!(names(&u, dir).len(), 50);
    // Not a directory, or no such node: nothing happens.
    let file = u.lookup(dir, b"f00000").unwrap().ino;
    assert!(!u.warm_dir(file, 10));
    assert!(!u.warm_dir(1 << 40, 10));
}

#[test]
fn a_deep_stack_merges_the_same_when_listed_in_parallel() {
    let d = tempfile::tempdir().unwrap();
    // Fourteen layers (listed on several threads), top first. Layer 11's copy of `d` is
    // opaque, layer 2 whites out layer 4's file, layer 8 has no `d` at all.
    let mut lowers = Vec::new();
    for i in 0..14 {
        let layer = d.path().join(format!("l{i:02}"));
        if i != 8 {
            fs::create_dir_all(layer.join("d")).unwrap();
            fs::write(layer.join(format!("d/f{i}")), format!("{i}")).unwrap();
            fs::write(layer.join("d/shared"), format!("{i}")).unwrap();
        } else {
            fs::create_dir_all(&layer).unwrap();
        }
        lowers.push(layer);
    }
    fs::write(d.path().join("l02/d/.wh.f4"), b"").unwrap();
    fs::write(d.path().join("l11/d/.wh..wh..opq"), b"").unwrap();
    let u = Union::new(&UnionConfig {
        lowers,
        upper: None,
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap();
    let dir = u.lookup(ROOT, b"d").unwrap().ino;
    let mut listed = names(&u, dir);
    listed.sort();
    let want: Vec<Vec<u8>> = [
        "f0", "f1", "f10", "f11", "f2", "f3", "f5", "f6", "f7", "f9", "shared",
    ]
    .iter()
    .map(|n| n.as_bytes().to_vec())
    .collect();
    assert_eq!(listed, want);
    let shared = u.lookup(dir, b"shared").unwrap();
    assert_eq!(shared.st.size, 1, "the top layer's copy wins");
    assert!(u.lookup(dir, b"f4").is_err());
    assert!(u.lookup(dir, b"f12").is_err());
}

/// Name operations reuse their parent directory's fd between requests; a rename or a removal
/// of that directory must not leave a later request working in the old one.
#[test]
fn a_moved_or_replaced_parent_is_not_used_through_a_kept_descriptor() {
    let d = tempfile::tempdir().unwrap();
    let (low, up, work) = (
        d.path().join("low"),
        d.path().join("up"),
        d.path().join("work"),
    );
    for p in [&low, &up, &work] {
        fs::create_dir_all(p).unwrap();
    }
    let u = Union::new(&UnionConfig {
        lowers: vec![low],
        upper: Some((up.clone(), work)),
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap();
    let caller = Caller::root();
    let chmod = |ino: u64, mode: u32| {
        let changes = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        u.setattr(ino, &changes, None).unwrap();
    };
    let mode_of = |rel: &str| fs::metadata(up.join(rel)).unwrap().permissions().mode() & 0o7777;
    let make = |top: &[u8]| {
        let a = u.mkdir(ROOT, top, 0o755, &caller).unwrap().ino;
        let b = u.mkdir(a, b"b", 0o755, &caller).unwrap().ino;
        u.create(b, b"f", 0o644, libc::O_WRONLY, &caller)
            .unwrap()
            .0
            .ino
    };

    let first = make(b"a");
    chmod(first, 0o600); // a/b is now a kept descriptor
    u.rename(ROOT, b"a", ROOT, b"moved", 0).unwrap();
    let second = make(b"a");
    chmod(second, 0o640);
    assert_eq!(mode_of("a/b/f"), 0o640, "the new a/b/f changed");
    assert_eq!(mode_of("moved/b/f"), 0o600, "the moved file kept its mode");

    // Removed and made again under the same name.
    chmod(second, 0o600);
    let a = u.lookup(ROOT, b"a").unwrap().ino;
    let b = u.lookup(a, b"b").unwrap().ino;
    u.remove(b, b"f", false).unwrap();
    u.remove(a, b"b", true).unwrap();
    let b = u.mkdir(a, b"b", 0o755, &caller).unwrap().ino;
    let third = u
        .create(b, b"f", 0o644, libc::O_WRONLY, &caller)
        .unwrap()
        .0
        .ino;
    chmod(third, 0o604);
    assert_eq!(mode_of("a/b/f"), 0o604);
}

/// A long listing is looked up a chunk at a time: every entry once, in listing order, and a
/// stop in a later chunk leaves exactly the entries taken referenced.
#[test]
fn a_long_listing_is_looked_up_across_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (low, mid) = (d.path().join("low"), d.path().join("mid"));
    files(&low.join("dir"), 700);
    files(&mid.join("dir"), 100);
    let u = Union::new(&UnionConfig {
        lowers: vec![mid, low],
        upper: None,
        fsync: false,
        redirect_dir: false,
        metacopy: false,
        data_lowers: Vec::new(),
    })
    .unwrap();
    let dir = u.lookup(ROOT, b"dir").unwrap().ino;
    let (entries, start) = u.read_dir(dir, 0).unwrap();
    let listed = &entries[start..];
    assert_eq!(listed.len(), 700);
    let nodes_before = u.node_count();
    let mut seen = Vec::new();
    u.lookup_listed(dir, listed, None, |e, found| {
        assert!(matches!(found, Listing::Found(_)), "{:?}", e.name);
        seen.push(e.name.to_vec());
        true
    })
    .unwrap();
    let want: Vec<Vec<u8>> = listed.iter().map(|e| e.name.to_vec()).collect();
    assert_eq!(seen, want);
    assert_eq!(u.node_count(), nodes_before + 700);
    // Stop at the 600th entry (third chunk): 599 more references, the refused one given back.
    let mut taken = Vec::new();
    u.lookup_listed(dir, listed, None, |_, found| {
        if let Listing::Found(attr) = found {
            taken.push(attr.ino);
        }
        taken.len() < 600
    })
    .unwrap();
    assert_eq!(taken.len(), 600);
    for e in listed {
        let ino = u.lookup(dir, &e.name).unwrap().ino;
        u.forget(ino, 2);
    }
    for ino in &taken[..599] {
        u.forget(*ino, 1);
    }
    assert_eq!(u.node_count(), nodes_before);
}

/// A capability set while another request finds the attribute missing must show afterwards:
/// the miss remembered by that request may not hide it (the kernel decides from it whether
/// a write drops the file's capabilities).
#[test]
fn an_xattr_set_during_a_miss_is_not_hidden_by_it() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("low")).unwrap();
    fs::write(d.path().join("low/tool"), "elf").unwrap();
    let u = writable_union(d.path());
    let ino = u.lookup(ROOT, b"tool").unwrap().ino;
    // VFS_CAP_REVISION_2 with CAP_NET_RAW (13) permitted and effective.
    let mut cap = vec![0x01, 0, 0, 0x02];
    cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    let name = b"security.capability";
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = u.getxattr(ino, name);
            }
        });
        let until = Instant::now() + std::time::Duration::from_secs(2);
        let mut rounds = 0;
        while Instant::now() < until {
            u.setxattr(ino, name, &cap, 0).unwrap();
            let seen = u.getxattr(ino, name).ok();
            if seen.as_deref() != Some(&cap[..]) {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!("set in round {rounds}, but getxattr answers {seen:?}");
            }
            u.removexattr(ino, name).unwrap();
            rounds += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}
