//! `coord replay`: replay (or resume) the configuration's versions that are
//! not active, without activating them.

use std::sync::Arc;

use anyhow::anyhow;
use coord::replay::{replay_many, ReplayOptions, StartOutcome};
use coord::{Projector, ProjectorSet};

use crate::context::Context;
use crate::output;
use crate::progress::Bars;

/// Arguments of `coord replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Replay only this projector.
    #[arg(long, value_name = "NAME")]
    pub projector: Option<String>,
    /// Projector versions replayed at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    /// Events per batch (one transaction each).
    #[arg(long, default_value_t = crate::context::BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Bytes per batch, as stored: a batch also closes before the event that
    /// would take it past this, so memory follows this budget.
    #[arg(long, value_name = "BYTES", default_value_t = crate::context::BATCH_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_bytes: u64,
}

/// The projectors of `set` named `only` (all when `None`).
pub fn select(set: &ProjectorSet, only: Option<&str>) -> anyhow::Result<Vec<Arc<dyn Projector>>> {
    match only {
        None => Ok(set.iter().cloned().collect()),
        Some(name) => match set.get(name) {
            Some(p) => Ok(vec![Arc::clone(p)]),
            None => {
                let known: Vec<String> = set.iter().map(|p| p.name().to_string()).collect();
                Err(coord::Error::InvalidInput(format!(
                    "unknown projector {name:?}: the configuration has {}",
                    known.join(", ")
                ))
                .into())
            }
        },
    }
}

pub async fn run(ctx: &Context, args: &ReplayArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let set = ctx.projectors(&config);
    let selected = select(&set, args.projector.as_deref())?;
    let jobs = usize::from(args.jobs);
    let pool = ctx.writable_pool(&config, jobs * 2 + 1).await?;
    let cancel = crate::progress::cancel_on_ctrl_c();
    let bars = Bars::new(!ctx.json());
    let options = ReplayOptions {
        batch_size: args.batch_size as usize,
        batch_bytes: crate::context::batch_bytes(args.batch_bytes),
        jobs,
        progress: Some(bars.callback()),
        ..ReplayOptions::default()
    };
    let outcomes = replay_many(
        &pool,
        &selected,
        &config.event_store,
        &options,
        &ctx.actor,
        &cancel,
    )
    .await;
    bars.finish();

    let done = coord::Steps::collect(
        "replayed",
        "projectors",
        outcomes.into_iter().map(|o| (o.label, o.result)),
    )?;
    let cancelled = done
        .iter()
        .any(|d| d.catch_up.as_ref().is_some_and(|c| c.cancelled));
    if ctx.json() {
        return output::json(&serde_json::json!({
            "projectors": done,
            "cancelled": cancelled,
        }));
    }
    for d in &done {
        let label = format!("{}@{}", d.start.projector, d.start.version);
        match (&d.start.outcome, &d.catch_up) {
            (StartOutcome::AlreadyActive, _) | (_, None) => {
                println!("{label}: already active; nothing to replay");
            }
            (outcome, Some(c)) => {
                let how = match outcome {
                    StartOutcome::Resumed => "resumed",
                    StartOutcome::Restarted => "restarted",
                    _ => "replayed",
                };
                println!(
                    "{label}: {how} into schema {}: {} events applied, {} parked, in {:.1} s ({:.0} events/s); {} left{}",
                    d.start.schema,
                    c.applied,
                    c.parked,
                    c.elapsed.as_secs_f64(),
                    c.rate_per_s(),
                    c.remaining,
                    if c.cancelled { "; interrupted, checkpoint saved: run it again to resume" } else { "" }
                );
            }
        }
    }
    if cancelled {
        return Err(anyhow!("interrupted; the checkpoint is saved"));
    }
    Ok(())
}
