//! The `layerfs` binary: parse, set up logging, run, map errors to exit codes.

fn main() {
    std::process::exit(layerfs::cli::main());
}
