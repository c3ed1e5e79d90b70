//! The `coord` command line (see `coord::cli`).

fn main() -> std::process::ExitCode {
    coord::cli::main()
}
