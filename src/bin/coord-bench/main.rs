//! `coord-bench`: figures for coord's claims, each against its own database
//! on the server of `DATABASE_URL`. Not a test: it prints, it asserts nothing.

mod gate;
mod support;

use clap::{Parser, Subcommand, ValueEnum};

/// Benchmarks of coord against a PostgreSQL server.
#[derive(Debug, Parser)]
#[command(name = "coord-bench")]
struct Cli {
    /// Server to benchmark against (each benchmark creates and drops its own database).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    bench: Bench,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Publishing throughput with the gate on versus off.
    Gate(gate::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let json = cli.output == Output::Json;
    runtime.block_on(async {
        let report = match cli.bench {
            Bench::Gate(args) => gate::run(&cli.database_url, args).await?,
        };
        if json {
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(())
    })
}
