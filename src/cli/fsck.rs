//! `layerfs fsck`: check an upper directory or the whole store, print each finding.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug, Default)]
pub struct FsckArgs {
    /// The upper directory to check.
    #[arg(required_unless_present = "store")]
    pub upper: Option<PathBuf>,
    /// Check the layer store (--root) instead: index, blob digests, layer directories,
    /// leftovers of killed commands.
    #[arg(long, conflicts_with_all = ["upper", "lowers", "work"])]
    pub store: bool,
    /// The lowers it is mounted over, top first (finds whiteouts that hide nothing).
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// Its work directory (finds leftovers of interrupted operations).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Repair what can be repaired without losing data (refused while the upper is in use).
    #[arg(long)]
    pub repair: bool,
}

/// `layerfs fsck`: print each finding and a summary; 0 when nothing is left to fix.
pub(super) fn fsck(root: &Option<PathBuf>, a: FsckArgs) -> Result<i32> {
    let report = match a.upper {
        Some(upper) if !a.store => crate::fsck::check_upper(&crate::fsck::FsckConfig {
            upper,
            lowers: a.lowers,
            work: a.work,
            repair: a.repair,
        })?,
        _ => {
            let root = root.clone().unwrap_or_else(crate::store::default_root);
            crate::fsck::check_store(&root, a.repair)?
        }
    };
    for f in &report.findings {
        println!("{f}");
    }
    println!(
        "{} entries checked, {} problems found, {} repaired",
        report.entries,
        report.problems(),
        report.repaired()
    );
    Ok(if report.clean() { 0 } else { 1 })
}
