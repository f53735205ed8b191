//! The ARGs Docker defines without an ARG instruction.
//!
//! - Platform ARGs (BuildKit): `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT`,
//!   `BUILDPLATFORM`, `BUILDOS`, `BUILDARCH`, `BUILDVARIANT`. They live in the global scope
//!   (FROM lines can use them); a stage sees one only after a bare `ARG NAME`. layerfs builds
//!   for the host, so build and target platform are both this machine, named the OCI way
//!   (`linux/amd64`, `linux/arm64`, `linux/arm/v7`, ...).
//! - Proxy ARGs: [`PROXY_ARGS`]. Usable from RUN when given as build args even if no ARG
//!   declares them, and left out of the image history and the cache key unless an ARG
//!   declares them.

use std::fmt;

/// The platform ARG names, target first.
pub const PLATFORM_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// The proxy ARGs Docker predefines.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Whether `name` is a proxy ARG. BuildKit compares without regard to case, so `Http_Proxy`
/// counts too.
pub fn is_proxy_arg(name: &str) -> bool {
    PROXY_ARGS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// An OCI platform: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// Empty when the architecture has no variant.
    pub variant: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// The OCI (Go `GOARCH`) name and variant of a Rust `target_arch`.
pub fn oci_arch(rust_arch: &str, little_endian: bool) -> (String, String) {
    let (arch, variant) = match (rust_arch, little_endian) {
        ("x86_64", _) => ("amd64", ""),
        ("x86", _) => ("386", ""),
        ("aarch64", _) => ("arm64", ""),
        // Rust does not say which ARM revision; v7 is what 32-bit ARM Linux images target.
        ("arm", _) => ("arm", "v7"),
        ("powerpc64", true) => ("ppc64le", ""),
        ("powerpc64", false) => ("ppc64", ""),
        ("mips", true) => ("mipsle", ""),
        ("mips64", true) => ("mips64le", ""),
        ("loongarch64", _) => ("loong64", ""),
        (other, _) => (other, ""),
    };
    (arch.to_string(), variant.to_string())
}

/// This machine as an OCI platform.
pub fn host_platform() -> Platform {
    let (architecture, variant) = oci_arch(std::env::consts::ARCH, cfg!(target_endian = "little"));
    Platform {
        os: "linux".to_string(),
        architecture,
        variant,
    }
}

/// The platform ARGs with their values for this host.
pub fn platform_args() -> Vec<(&'static str, String)> {
    let p = host_platform();
    let [tp, tos, tarch, tvar, bp, bos, barch, bvar] = PLATFORM_ARGS;
    vec![
        (tp, p.to_string()),
        (tos, p.os.clone()),
        (tarch, p.architecture.clone()),
        (tvar, p.variant.clone()),
        (bp, p.to_string()),
        (bos, p.os.clone()),
        (barch, p.architecture.clone()),
        (bvar, p.variant.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        let cases = [
            ("x86_64", true, "amd64", ""),
            ("aarch64", true, "arm64", ""),
            ("arm", true, "arm", "v7"),
            ("x86", true, "386", ""),
            ("powerpc64", true, "ppc64le", ""),
            ("powerpc64", false, "ppc64", ""),
            ("s390x", false, "s390x", ""),
            ("riscv64", true, "riscv64", ""),
            ("loongarch64", true, "loong64", ""),
            ("mips64", false, "mips64", ""),
        ];
        for (rust, le, arch, variant) in cases {
            assert_eq!(
                oci_arch(rust, le),
                (arch.to_string(), variant.to_string()),
                "{rust}"
            );
        }
        let p = Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: "v7".into(),
        };
        assert_eq!(p.to_string(), "linux/arm/v7");
    }

    #[test]
    fn host_args() {
        let args = platform_args();
        let get = |k: &str| args.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("TARGETOS").as_deref(), Some("linux"));
        assert_eq!(get("BUILDOS").as_deref(), Some("linux"));
        assert_eq!(get("TARGETPLATFORM"), get("BUILDPLATFORM"));
        let platform = get("TARGETPLATFORM").unwrap();
        assert!(platform.starts_with(&format!("linux/{}", get("TARGETARCH").unwrap())));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(platform, "linux/amd64");
        }
        assert_eq!(args.len(), PLATFORM_ARGS.len());
        assert!(is_proxy_arg("https_proxy") && is_proxy_arg("Https_Proxy"));
        assert!(!is_proxy_arg("PROXY"));
    }
}
