//! The `coord` command line as a library entry point (feature `cli`): every
//! `coord` command, with the same flags, output, progress bars and exit codes,
//! for an application's own binary with its Rust projectors added to those of
//! `coord.toml` ([`run`]). The `coord` binary is [`run`] with no Rust
//! projectors. A thin layer over the library's public API: it holds no logic
//! of its own beyond arguments, printing and exit codes.

pub(crate) mod commands;
pub(crate) mod context;
pub(crate) mod output;
pub(crate) mod progress;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use context::GlobalArgs;
use coord::ProjectorSet;

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
    /// Exit 0 when this configuration may publish now, otherwise the gate error's exit code.
    Check(commands::check::CheckArgs),
    /// Append one event through the gate, run the active inline projectors, print its position.
    Publish(commands::publish::PublishArgs),
    /// What activate-current-config would do, and how many events each step processes; writes nothing.
    Plan,
    /// Plan, replay, catch up, verify, activate, retire; idempotent and resumable.
    ActivateCurrentConfig(commands::activate::ActivateArgs),
    /// Re-activate the previous version of a projector after catching it up (no replay from zero).
    Rollback(commands::activate::RollbackArgs),
    /// Drop the schemas of retired and aborted versions.
    Prune(commands::activate::PruneArgs),
    /// Rebuild the active version of a projector in place, without stopping publishers.
    Rebuild(commands::activate::RebuildArgs),
    /// Block until this configuration's versions are active.
    Wait(commands::wait::WaitArgs),
    /// Run async projectors: tail the store, one leader per version, stop when a newer version is active.
    Run,
    /// HTTP: /ready (200 only while this configuration may publish), /status JSON, /metrics.
    Serve(commands::serve::ServeArgs),
    /// Replay (or resume) the configuration's new versions without activating them.
    Replay(commands::replay::ReplayArgs),
    /// Catch replaying versions up with the event store.
    CatchUp(commands::catch_up::CatchUpArgs),
    /// Drop a replay in progress; the active version is untouched.
    Abort(commands::abort::AbortArgs),
    /// Write a commented coord.toml to start from (the --config path; never overwrites).
    Init(commands::init::InitArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(commands::completions::CompletionsArgs),
}

/// Runs the `coord` command line with this process's arguments and exits
/// with its exit code; `projectors` (written in Rust) are added to those of
/// `coord.toml` in every command.
///
/// Call it from a synchronous `main` (it starts its own tokio runtime):
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     // The application's Rust projectors; none for the plain `coord` command.
///     coord::cli::run(coord::ProjectorSet::default())
/// }
/// ```
pub fn run(projectors: ProjectorSet) -> ExitCode {
    run_from(std::env::args_os(), projectors)
}

/// [`run`] with the given arguments instead of the process's; the first is the
/// program's name, as in [`std::env::args_os`]. An application with commands
/// of its own forwards the rest of its command line here, e.g. for
/// `bank coord status`:
///
/// ```no_run
/// # fn projectors() -> coord::ProjectorSet { coord::ProjectorSet::default() }
/// # fn own_commands(_: &[std::ffi::OsString]) -> std::process::ExitCode { todo!() }
/// fn main() -> std::process::ExitCode {
///     let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
///     if args.get(1).is_some_and(|a| a == "coord") {
///         let program = std::ffi::OsString::from("bank coord");
///         let rest = args[2..].iter().cloned();
///         return coord::cli::run_from(std::iter::once(program).chain(rest), projectors());
///     }
///     own_commands(&args)
/// }
/// ```
pub fn run_from<I, T>(args: I, projectors: ProjectorSet) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version print on stdout and exit 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // An application may have installed its own subscriber: keep it.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
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
    match runtime.block_on(dispatch(cli, projectors)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit_code(&err);
            output::print_error(output, &err, code);
            ExitCode::from(code)
        }
    }
}

async fn dispatch(cli: Cli, projectors: ProjectorSet) -> anyhow::Result<()> {
    let ctx = context::Context::new(cli.global, command_name(&cli.command), projectors);
    run_command(&ctx, cli.command)
        .await
        .map_err(|e| ctx.explain_connection_failure(e))
}

async fn run_command(ctx: &context::Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => commands::init::run(ctx, &args),
        Command::Completions(args) => commands::completions::run(&args, Cli::command()),
        Command::Migrate => commands::migrate::run(ctx).await,
        Command::Status => commands::status::run(ctx).await,
        Command::Check(args) => commands::check::run(ctx, args).await,
        Command::Publish(args) => commands::publish::run(ctx, args).await,
        Command::Plan => commands::plan::run(ctx).await,
        Command::ActivateCurrentConfig(args) => commands::activate::activate(ctx, args).await,
        Command::Rollback(args) => commands::activate::rollback(ctx, args).await,
        Command::Prune(args) => commands::activate::prune(ctx, args).await,
        Command::Rebuild(args) => commands::activate::rebuild(ctx, args).await,
        Command::Wait(args) => commands::wait::run(ctx, args).await,
        Command::Run => commands::run::run(ctx).await,
        Command::Serve(args) => commands::serve::run(ctx, args).await,
        Command::Replay(args) => commands::replay::run(ctx, &args).await,
        Command::CatchUp(args) => commands::catch_up::run(ctx, &args).await,
        Command::Abort(args) => commands::abort::run(ctx, &args).await,
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Migrate => "migrate",
        Command::Status => "status",
        Command::Check(_) => "check",
        Command::Publish(_) => "publish",
        Command::Plan => "plan",
        Command::ActivateCurrentConfig(_) => "activate-current-config",
        Command::Rollback(_) => "rollback",
        Command::Prune(_) => "prune",
        Command::Rebuild(_) => "rebuild",
        Command::Wait(_) => "wait",
        Command::Run => "run",
        Command::Serve(_) => "serve",
        Command::Replay(_) => "replay",
        Command::CatchUp(_) => "catch-up",
        Command::Abort(_) => "abort",
        Command::Init(_) => "init",
        Command::Completions(_) => "completions",
    }
}

/// The exit code of DESIGN.md for an error: the library's mapping when it is
/// a library error, else 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<coord::Error>())
        .map_or(1, coord::Error::exit_code)
}
