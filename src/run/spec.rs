//! The OCI runtime spec (`config.json`) of one container, and the small files bind-mounted into
//! it, as Docker and BuildKit set them up for a `RUN` step.
//!
//! Pure: everything here is a function of the [`RunSpec`], the bundle paths and this process's
//! rlimits, so the whole spec is unit-tested without a runtime. What it guarantees:
//!
//! - new mount, PID, IPC and UTS namespaces, and a new network namespace for
//!   [`Network::None`] (the runtime brings its loopback up); no user namespace;
//! - Docker's default capabilities in the bounding, effective and permitted sets (inheritable
//!   and ambient empty), `noNewPrivileges` false, Docker's masked and read-only /proc and /sys
//!   paths, every device denied in the device cgroup but the runtime's defaults (null, zero,
//!   full, random, urandom, tty, ptmx);
//! - of the host, only three generated files, read-only: /etc/hosts, /etc/resolv.conf and
//!   /etc/hostname; the root filesystem is writable (the step's writes land in its upper).

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use super::{Network, RunError, RunSpec};

/// `PATH` when the image sets none (Docker's and BuildKit's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Highest NOFILE/NPROC limit handed to a container (Docker's default cap).
pub const RLIMIT_CAP: u64 = 1 << 20;

/// Docker's default capability set (moby `oci/caps`): what a `RUN` step may do as root.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Paths hidden behind an empty file or tmpfs: kernel internals a container has no business
/// reading (Docker's list).
const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths of /proc remounted read-only: knobs that act on the whole host.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Paths of the generated files in the bundle.
pub struct BundleFiles<'a> {
    pub hosts: &'a Path,
    pub resolv_conf: &'a Path,
    pub hostname: &'a Path,
}

/// This process's NOFILE and NPROC limits, each `(soft, hard)`, as the container gets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub nofile: (u64, u64),
    pub nproc: (u64, u64),
}

impl Limits {
    /// The current process's limits, capped at [`RLIMIT_CAP`]: a runtime cannot raise a
    /// limit above our hard one (some sandboxes keep it low), and unlimited is never passed on.
    pub fn current() -> Limits {
        let get = |which| {
            let (soft, hard) = crate::sys::getrlimit(which).unwrap_or((1024, 1024));
            (soft.min(RLIMIT_CAP), hard.min(RLIMIT_CAP))
        };
        Limits {
            nofile: get(crate::sys::Rlimit::Nofile),
            nproc: get(crate::sys::Rlimit::Nproc),
        }
    }
}

/// Mount target paths inside the rootfs, and whether each is a directory: what the runtime
/// would create when missing (see `stubs`).
pub const MOUNT_TARGETS: [(&str, bool); 6] = [
    ("/proc", true),
    ("/dev", true),
    ("/sys", true),
    ("/etc/hosts", false),
    ("/etc/resolv.conf", false),
    ("/etc/hostname", false),
];

/// The environment of the process: `env` as given, then `PATH`, `HOSTNAME` and `HOME` for
/// whichever of them it does not set.
pub fn environment(spec: &RunSpec) -> Vec<String> {
    let has = |key: &str| {
        spec.env
            .iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    let mut env = Vec::with_capacity(spec.env.len() + 3);
    if !has("PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOSTNAME") {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    if !has("HOME") {
        env.push(format!("HOME={}", spec.user.home));
    }
    env.extend(spec.env.iter().cloned());
    env
}

/// `/etc/hosts`: loopback names and the container's hostname.
pub fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    )
}

/// `/etc/hostname`.
pub fn hostname_file(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// `/etc/resolv.conf`: the host's for [`Network::Host`] (given as `host_resolv`); for
/// [`Network::None`] a file that names no server (there is nothing to reach).
pub fn resolv_conf_file(network: Network, host_resolv: &[u8]) -> Vec<u8> {
    match network {
        Network::Host => host_resolv.to_vec(),
        Network::None => b"# no network (--network none): no name servers\n".to_vec(),
    }
}

fn oci(what: &str, e: impl std::fmt::Display) -> RunError {
    RunError::invalid(format!("build the runtime spec ({what}): {e}"))
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, RunError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| oci(dest, e))
}

fn bind_ro(dest: &str, source: &Path) -> Result<Mount, RunError> {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(
            ["rbind", "ro", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .map_err(|e| oci(dest, e))
}

fn rlimit(
    typ: PosixRlimitType,
    (soft, hard): (u64, u64),
) -> Result<oci_spec::runtime::PosixRlimit, RunError> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .soft(soft)
        .hard(hard)
        .build()
        .map_err(|e| oci("rlimit", e))
}

/// The runtime spec for `spec`, whose rootfs is `rootfs` (absolute), in container `id`.
pub fn build(
    spec: &RunSpec,
    rootfs: &Path,
    id: &str,
    files: &BundleFiles<'_>,
    limits: Limits,
) -> Result<Spec, RunError> {
    let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(|e| oci("capabilities", e))?;
    let user = UserBuilder::default()
        .uid(spec.user.uid)
        .gid(spec.user.gid)
        .additional_gids(spec.user.additional_gids.clone())
        .build()
        .map_err(|e| oci("user", e))?;
    let process = ProcessBuilder::default()
        .terminal(spec.tty)
        .user(user)
        .args(spec.args.clone())
        .env(environment(spec))
        .cwd(&spec.cwd)
        .capabilities(capabilities)
        .rlimits(vec![
            rlimit(PosixRlimitType::RlimitNofile, limits.nofile)?,
            rlimit(PosixRlimitType::RlimitNproc, limits.nproc)?,
        ])
        .no_new_privileges(false)
        .build()
        .map_err(|e| oci("process", e))?;

    let mut ns_types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if spec.network == Network::None {
        // A namespace without a path: the runtime creates it and brings `lo` up in it (runc's
        // "loopback" network, crun likewise), as Docker's `--network none`.
        ns_types.push(LinuxNamespaceType::Network);
    }
    let namespaces = ns_types
        .into_iter()
        .map(|t| {
            LinuxNamespaceBuilder::default()
                .typ(t)
                .build()
                .map_err(|e| oci("namespace", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Deny every device; the runtime appends its defaults (null, zero, full, tty, random,
    // urandom, ptmx, pts) after this rule. Without it a root step with CAP_MKNOD could open a
    // block device of the host.
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(|e| oci("devices", e))?;
    let resources = LinuxResourcesBuilder::default()
        .devices(vec![deny_all])
        .build()
        .map_err(|e| oci("resources", e))?;
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        // cgroupfs: one group per container under /layerfs, removed by the runtime on delete.
        .cgroups_path(format!("/layerfs/{id}"))
        .masked_paths(MASKED_PATHS.map(String::from).to_vec())
        .readonly_paths(READONLY_PATHS.map(String::from).to_vec())
        .build()
        .map_err(|e| oci("linux", e))?;

    let mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        bind_ro("/etc/hosts", files.hosts)?,
        bind_ro("/etc/resolv.conf", files.resolv_conf)?,
        bind_ro("/etc/hostname", files.hostname)?,
    ];
    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(false)
        .build()
        .map_err(|e| oci("root", e))?;
    SpecBuilder::default()
        .version("1.0.2")
        .root(root)
        .mounts(mounts)
        .process(process)
        .hostname(&spec.hostname)
        .linux(linux)
        .build()
        .map_err(|e| oci("spec", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::User;
    use std::path::PathBuf;

    fn sample() -> RunSpec {
        let mut s = RunSpec::new("/r", vec!["/bin/sh".into(), "-c".into(), "true".into()]);
        s.env = vec!["A=1".into(), "HOME=/custom".into()];
        s.cwd = "/work".into();
        s.hostname = "box".into();
        s.user = User {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![2000],
            home: "/home/app".into(),
        };
        s
    }

    fn json(spec: &RunSpec) -> serde_json::Value {
        let files = BundleFiles {
            hosts: Path::new("/b/hosts"),
            resolv_conf: Path::new("/b/resolv.conf"),
            hostname: Path::new("/b/hostname"),
        };
        let limits = Limits {
            nofile: (1024, 4096),
            nproc: (100, 200),
        };
        let s = build(spec, &PathBuf::from("/abs/rootfs"), "c1", &files, limits).unwrap();
        serde_json::to_value(&s).unwrap()
    }

    #[test]
    fn environment_defaults() {
        let mut s = sample();
        assert_eq!(
            environment(&s),
            [
                format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=box".into(),
                "A=1".into(),
                "HOME=/custom".into()
            ]
        );
        s.env = vec!["PATH=/x".into(), "HOSTNAME=h".into()];
        assert_eq!(environment(&s), ["HOME=/home/app", "PATH=/x", "HOSTNAME=h"]);
    }

    #[test]
    fn process_and_security() {
        let v = json(&sample());
        let p = &v["process"];
        assert_eq!(p["args"], serde_json::json!(["/bin/sh", "-c", "true"]));
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], false);
        assert_eq!(
            p["user"],
            serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [2000]})
        );
        let mut eff: Vec<String> =
            serde_json::from_value(p["capabilities"]["effective"].clone()).unwrap();
        eff.sort();
        assert_eq!(eff.len(), 14);
        assert!(eff.contains(&"CAP_AUDIT_WRITE".to_string()));
        assert!(!eff.contains(&"CAP_SYS_ADMIN".to_string()));
        assert_eq!(p["capabilities"]["ambient"], serde_json::json!([]));
        assert_eq!(p["capabilities"]["inheritable"], serde_json::json!([]));
        assert_eq!(
            p["rlimits"],
            serde_json::json!([
                {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                {"type": "RLIMIT_NPROC", "soft": 100, "hard": 200}
            ])
        );
        assert_eq!(v["hostname"], "box");
        assert_eq!(
            v["root"],
            serde_json::json!({"path": "/abs/rootfs", "readonly": false})
        );
        let l = &v["linux"];
        assert_eq!(l["cgroupsPath"], "/layerfs/c1");
        assert_eq!(
            l["resources"]["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        assert!(
            l["maskedPaths"]
                .as_array()
                .unwrap()
                .contains(&"/proc/kcore".into())
        );
        assert!(
            l["readonlyPaths"]
                .as_array()
                .unwrap()
                .contains(&"/proc/sys".into())
        );
        assert!(l.get("uidMappings").is_none() && l.get("seccomp").is_none());
    }

    #[test]
    fn namespaces_follow_the_network() {
        let types = |v: &serde_json::Value| -> Vec<String> {
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    assert!(n.get("path").is_none());
                    n["type"].as_str().unwrap().to_string()
                })
                .collect()
        };
        let mut s = sample();
        assert_eq!(types(&json(&s)), ["pid", "ipc", "uts", "mount", "network"]);
        s.network = Network::Host;
        assert_eq!(types(&json(&s)), ["pid", "ipc", "uts", "mount"]);
    }

    #[test]
    fn mounts_expose_only_generated_files() {
        let v = json(&sample());
        let mounts = v["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/etc/hostname"
            ]
        );
        for m in mounts {
            if m["type"] == "bind" {
                assert!(m["source"].as_str().unwrap().starts_with("/b/"));
                assert!(m["options"].as_array().unwrap().contains(&"ro".into()));
            }
        }
        let sys = mounts.iter().find(|m| m["destination"] == "/sys").unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&"ro".into()));
        // Every mount target on the rootfs itself is covered by the stub list.
        for d in dests.iter().filter(|d| !d.starts_with("/dev/")) {
            assert!(MOUNT_TARGETS.iter().any(|(t, _)| t == d), "{d}");
        }
    }

    #[test]
    fn generated_files() {
        assert_eq!(
            hosts_file("box"),
            "127.0.0.1\tlocalhost box\n::1\tlocalhost ip6-localhost ip6-loopback box\n"
        );
        assert_eq!(hostname_file("box"), "box\n");
        assert_eq!(
            resolv_conf_file(Network::Host, b"nameserver 1.1.1.1\n"),
            b"nameserver 1.1.1.1\n"
        );
        assert!(
            !String::from_utf8(resolv_conf_file(Network::None, b"nameserver 1.1.1.1\n"))
                .unwrap()
                .contains("nameserver")
        );
    }
}
