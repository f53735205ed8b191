//! A layer made by podman (containers-storage), exported with skopeo, imports and mounts to
//! the tree podman shows. Podman runs on a private storage root in the test's directory.

mod store_common;

use std::fs;
use std::process::Command;

use store_common::*;

struct Podman {
    storage: String,
    run: String,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.args([
            "--root",
            &self.storage,
            "--runroot",
            &self.run,
            "--storage-driver",
            "overlay",
        ]);
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        run(self.cmd().args(args)).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["image", "unmount", "--all", "--force"][..],
            &["unmount", "--all", "--force"],
            &["rm", "--all", "--force"],
            &["rmi", "--all", "--force"],
        ] {
            let _ = self.cmd().args(args).output();
        }
    }
}

#[test]
fn podman_layers_import_and_mount_to_the_same_tree() {
    if !root() || !have("podman") || !have("skopeo") {
        return;
    }
    let env = Env::new();
    let pm = Podman {
        storage: env.path("storage").display().to_string(),
        run: env.path("run").display().to_string(),
    };
    let rootfs = env.path("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    base_tree(&rootfs);
    let tar = env.path("root.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        rootfs.display(),
        tar.display()
    ));
    pm.ok(&["import", tar.to_str().unwrap(), "localhost/base:1"]);
    let c = pm.ok(&["create", "localhost/base:1", "/bin/true"]);
    let merged = pm.ok(&["mount", &c]);
    sh(&format!(
        "cd {merged} && rm etc/passwd && rm -r gone-dir && printf 'p\\n' > etc/podman && \
         rm -r opaque-later && mkdir opaque-later && touch opaque-later/n && \
         chmod 0600 etc/motd && mkdir -p new/dir && ln -s ../etc new/l"
    ));
    pm.ok(&["unmount", &c]);
    pm.ok(&["commit", "-q", &c, "localhost/new:1"]);
    let lay = env.path("lay").display().to_string();
    sh(&format!(
        "skopeo copy --quiet 'containers-storage:[overlay@{}+{}]localhost/new:1' oci:{lay}:new",
        pm.storage, pm.run
    ));
    let ids = env.ok(&["import", "--oci", &format!("{lay}:new")]);
    assert_eq!(ids.lines().count(), 2, "{ids}");
    let podman_view = pm.ok(&["image", "mount", "localhost/new:1"]);
    // The root's own attributes are containers-storage's (its layer directories are 0555),
    // not the image's: compare everything below it.
    let below = |mut s: Vec<String>| {
        s.retain(|l| !l.starts_with(". dir "));
        s
    };
    let want = below(snapshot(std::path::Path::new(&podman_view)));
    let m = LayerfsMount::mount(&env, &["--image", "new"], &env.path("m"));
    assert_same(
        &want,
        &below(snapshot(&m.0)),
        "podman image mount vs layerfs mount",
    );
}
