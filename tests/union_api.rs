//! The union through its library API, without FUSE: behaviour that needs more names than a
//! mount test should create, such as directory indexes dropped and rebuilt under the memory
//! budget.

use std::fs;
use std::path::Path;

use layerfs::union::{Caller, ROOT, Union, UnionConfig};

fn files(dir: &Path, n: usize) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        fs::File::create(dir.join(format!("f{i:05}"))).unwrap();
    }
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
    let (up, work) = (d.path().join("up"), d.path().join("work"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    let u = Union::new(&UnionConfig {
        lowers: vec![d.path().join("low")],
        upper: Some((up, work)),
        fsync: false,
    })
    .unwrap();
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
