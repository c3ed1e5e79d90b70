//! `coord-bench`: benchmarks the project ships (not timed tests). Each
//! subcommand creates its own database on the server of `DATABASE_URL`,
//! prints human text or, with `--output json`, one JSON object.

mod activation;
mod bank;
mod catchup;
mod gate;
mod reference;
mod replay;
mod sql_publish;
mod support;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Benchmarks of coord.
#[derive(Debug, Parser)]
#[command(name = "coord-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Replay speed of the reference projector (Rust, config SQL, set-based SQL) beside the raw read speed.
    Replay(replay::Args),
    /// Time to catch up a fixed delta of new events on stores of growing size.
    Catchup(catchup::Args),
    /// Publishing throughput with the gate on versus off.
    Gate(gate::Args),
    /// Publishing throughput through `coord.publish` beside the Rust publisher.
    SqlPublish(sql_publish::Args),
    /// Blocked window, refusals, lost and doubled events of an activation under publishing.
    Activation(activation::Args),
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Text,
    /// One JSON object.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("coord-bench: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.bench {
            Bench::Replay(args) => replay::run(args).await,
            Bench::Catchup(args) => catchup::run(args).await,
            Bench::Gate(args) => gate::run(args).await,
            Bench::Activation(args) => activation::run(args).await,
            Bench::SqlPublish(args) => sql_publish::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("coord-bench: {err:#}");
            ExitCode::from(1)
        }
    }
}
