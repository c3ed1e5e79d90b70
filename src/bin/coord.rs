//! The `coord` command line: [`coord::cli::run`] with no Rust projectors.

fn main() -> std::process::ExitCode {
    coord::cli::run(coord::ProjectorSet::default())
}
