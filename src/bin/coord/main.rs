//! The `coord` command line: a thin layer over the library's public API.

mod commands;
mod context;
mod output;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use context::GlobalArgs;

/// Run version N and N+1 of an event-sourced application side by side on one
/// PostgreSQL database.
#[derive(Debug, Parser)]
#[command(name = "coord", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the coord schema.
    Migrate,
    /// Every projector: active, activating and replaying versions, progress, last transition.
    Status,
    /// Replay (or resume) the configuration's new versions without activating them.
    Replay(commands::replay::ReplayArgs),
    /// Catch replaying versions up with the event store.
    CatchUp(commands::catch_up::CatchUpArgs),
    /// Drop a replay in progress; the active version is untouched.
    Abort(commands::abort::AbortArgs),
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
            eprintln!("coord: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let output = cli.global.output;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit_code(&err);
            output::print_error(output, &err, code);
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = context::Context::new(cli.global, command_name(&cli.command));
    match &cli.command {
        Command::Migrate => commands::migrate::run(&ctx).await,
        Command::Status => commands::status::run(&ctx).await,
        Command::Replay(args) => commands::replay::run(&ctx, args).await,
        Command::CatchUp(args) => commands::catch_up::run(&ctx, args).await,
        Command::Abort(args) => commands::abort::run(&ctx, args).await,
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Migrate => "migrate",
        Command::Status => "status",
        Command::Replay(_) => "replay",
        Command::CatchUp(_) => "catch-up",
        Command::Abort(_) => "abort",
    }
}

/// The exit code of DESIGN.md for an error: the library's mapping when it is
/// a library error, else 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<coord::Error>())
        .map_or(1, coord::Error::exit_code)
}
