//! `coord activate-current-config`, `coord rollback`, `coord prune`, `coord rebuild`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use coord::activation::{self, ActivateOptions};

use crate::context::Context;
use crate::output::{self, Table};

/// Lock and replay tuning shared by activation commands.
#[derive(Debug, Args)]
pub struct ActivationArgs {
    /// Seconds to wait for another activation to finish before exiting with code 7.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub lock_wait: f64,
    /// Seconds the critical section may keep retrying its short lock waits before exiting with code 7.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub lock_deadline: f64,
    /// Events per replay batch.
    #[arg(long, value_name = "N", default_value_t = crate::context::BATCH_SIZE as usize)]
    pub batch_size: usize,
    /// Bytes per batch, as stored: a batch also closes before the event that
    /// would take it past this, so memory follows this budget.
    #[arg(long, value_name = "BYTES", default_value_t = crate::context::BATCH_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_bytes: u64,
    /// Projector versions replayed at once.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub jobs: usize,
}

impl ActivationArgs {
    pub fn options(&self, ctx: &Context) -> anyhow::Result<ActivateOptions> {
        for (flag, v) in [
            ("--lock-wait", self.lock_wait),
            ("--lock-deadline", self.lock_deadline),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(coord::Error::InvalidInput(format!(
                    "{flag} must be a number of seconds >= 0"
                ))
                .into());
            }
        }
        if self.batch_size == 0 || self.jobs == 0 {
            return Err(coord::Error::InvalidInput(
                "--batch-size and --jobs must be at least 1".into(),
            )
            .into());
        }
        let mut options = ActivateOptions {
            lock_wait: Duration::from_secs_f64(self.lock_wait),
            ..ActivateOptions::default()
        };
        options.locks.deadline = Duration::from_secs_f64(self.lock_deadline);
        options.replay.batch_size = self.batch_size;
        options.replay.batch_bytes = crate::context::batch_bytes(self.batch_bytes);
        options.replay.jobs = self.jobs;
        options.replay.progress = crate::progress::callback(ctx);
        Ok(options)
    }
}

/// Arguments of `coord activate-current-config`.
#[derive(Debug, Args)]
pub struct ActivateArgs {
    /// Refuse versions that need a replay instead of replaying them.
    #[arg(long)]
    pub no_replay: bool,
    #[command(flatten)]
    pub tuning: ActivationArgs,
}

pub async fn activate(ctx: &Context, args: ActivateArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let mut options = args.tuning.options(ctx)?;
    options.no_replay = args.no_replay;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, options.replay.jobs * 2 + 2)?;
    let cancel = crate::progress::cancel_on_ctrl_c();
    let report = coord::activation::activate_current_config(
        &pool,
        &url,
        &ctx.projectors(&config),
        &config.event_store,
        &options,
        &ctx.actor,
        &cancel,
    )
    .await?;
    if ctx.json() {
        return output::json(&report);
    }
    if report.steps.is_empty() {
        println!("nothing to do: every configured version is active");
        return Ok(());
    }
    print!("{}", render_steps(&report.steps, Some(&report.plan)));
    Ok(())
}

/// The steps carried out; with the plan, each action in the words `coord
/// plan` printed for it.
pub fn render_steps(steps: &[activation::StepReport], plan: Option<&activation::Plan>) -> String {
    let mut table = Table::new(&[
        "PROJECTOR",
        "ACTION",
        "FROM",
        "TO",
        "REPLAYED",
        "REPLAY S",
        "FINAL",
        "HELD BACK MS",
    ]);
    for s in steps {
        let sw = s.switch.as_ref();
        table.row(vec![
            s.projector.clone(),
            plan.and_then(|p| p.steps.iter().find(|step| step.projector == s.projector))
                .map_or_else(|| s.action.clone(), crate::commands::plan::describe),
            output::opt(sw.and_then(|w| w.from.clone())),
            output::opt(sw.and_then(|w| w.to.clone())),
            s.replayed_events.to_string(),
            format!("{:.1}", s.replay_seconds),
            output::opt(sw.map(|w| w.final_events)),
            output::opt(sw.map(|w| format!("{:.1}", w.held_back_ms))),
        ]);
    }
    table.render()
}

/// Arguments of `coord rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The projector to roll back (the configuration must define its previous version).
    pub projector: String,
    #[command(flatten)]
    pub tuning: ActivationArgs,
}

/// What rollback and rebuild both start from: one projector of the
/// configuration, its options, a pool and a cancellation token.
struct OneProjector {
    config: coord::Config,
    projector: std::sync::Arc<dyn coord::Projector>,
    options: ActivateOptions,
    url: coord::DatabaseUrl,
    pool: deadpool_postgres::Pool,
    cancel: tokio_util::sync::CancellationToken,
}

fn one_projector(
    ctx: &Context,
    name: &str,
    tuning: &ActivationArgs,
) -> anyhow::Result<OneProjector> {
    coord::ProjectorName::new(name).map_err(coord::Error::InvalidInput)?;
    let config = ctx.config()?;
    let options = tuning.options(ctx)?;
    let projector = ctx.projectors(&config).get(name).cloned().ok_or_else(|| {
        coord::Error::InvalidInput(format!(
            "projector {name} is not in {}: run with the configuration that defines the version to act on",
            config.source_name
        ))
    })?;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, options.replay.jobs * 2 + 2)?;
    Ok(OneProjector {
        config,
        projector,
        options,
        url,
        pool,
        cancel: crate::progress::cancel_on_ctrl_c(),
    })
}

fn print_step(ctx: &Context, report: &activation::StepReport) -> anyhow::Result<()> {
    if ctx.json() {
        return output::json(report);
    }
    print!("{}", render_steps(std::slice::from_ref(report), None));
    Ok(())
}

pub async fn rollback(ctx: &Context, args: RollbackArgs) -> anyhow::Result<()> {
    let one = one_projector(ctx, &args.projector, &args.tuning)?;
    let report = activation::rollback(
        &one.pool,
        &one.url,
        &one.projector,
        &one.config.event_store,
        &one.options,
        &ctx.actor,
        &one.cancel,
    )
    .await?;
    print_step(ctx, &report)
}

/// Arguments of `coord prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Also drop objects outside coord's schemas that depend on them (a view over a retired version's table).
    #[arg(long)]
    pub cascade: bool,
}

pub async fn prune(ctx: &Context, args: PruneArgs) -> anyhow::Result<()> {
    let config = ctx.optional_config()?;
    let url = ctx.database_url(config.as_ref())?;
    let pool = coord::pool(&url, 2)?;
    let dependents = coord::Dependents::cascade_if(args.cascade);
    let candidates = {
        let client = pool.get().await?;
        coord::ensure_writable(&**client).await?;
        let candidates = coord::activation::prunable(&**client).await?;
        // Refuse before asking for a confirmation that could not be honoured.
        let schemas: Vec<&str> = candidates.iter().map(|v| v.schema_name.as_str()).collect();
        coord::schema_drop::ensure_droppable(&**client, &schemas, dependents, "coord prune")
            .await?;
        candidates
    };
    if candidates.is_empty() {
        if ctx.json() {
            return output::json(&serde_json::json!({ "pruned": [] }));
        }
        println!("nothing to prune");
        return Ok(());
    }
    if !args.yes {
        eprintln!(
            "coord prune would drop these schemas (their versions can no longer be rolled back to):"
        );
        for v in &candidates {
            eprintln!(
                "  {} ({}@{}, {})",
                v.schema_name, v.name, v.version, v.status
            );
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(coord::Error::InvalidInput(
                "nothing dropped: confirm with --yes when not running at a terminal".into(),
            )
            .into());
        }
        eprint!("drop them? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing pruned");
            return Ok(());
        }
    }
    let pruned = coord::activation::prune(
        &pool,
        &ctx.actor,
        coord::Dependents::cascade_if(args.cascade),
    )
    .await?;
    if ctx.json() {
        return output::json(&serde_json::json!({ "pruned": pruned }));
    }
    for v in &pruned {
        println!("dropped {} ({}@{})", v.schema_name, v.name, v.version);
    }
    Ok(())
}

/// Arguments of `coord rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// The projector whose active version to rebuild.
    pub projector: String,
    /// Also drop objects outside coord's schemas that depend on the replaced tables.
    #[arg(long)]
    pub cascade: bool,
    #[command(flatten)]
    pub tuning: ActivationArgs,
}

pub async fn rebuild(ctx: &Context, args: RebuildArgs) -> anyhow::Result<()> {
    let mut one = one_projector(ctx, &args.projector, &args.tuning)?;
    one.options.dependents = coord::Dependents::cascade_if(args.cascade);
    let report = activation::rebuild(
        &one.pool,
        &one.url,
        &one.projector,
        &one.config.event_store,
        &one.options,
        &ctx.actor,
        &one.cancel,
    )
    .await?;
    print_step(ctx, &report)
}
