//! `coord catch-up`: catch the configuration's replaying and active versions up.

use coord::replay::{catch_up_configured, ReplayOptions};
use coord::ProjectorSet;

use crate::commands::replay::select;
use crate::context::Context;
use crate::output;
use crate::progress::Bars;

/// Arguments of `coord catch-up`.
#[derive(Debug, clap::Args)]
pub struct CatchUpArgs {
    /// Catch up only this projector.
    #[arg(long, value_name = "NAME")]
    pub projector: Option<String>,
    /// Events per batch (one transaction each).
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Bytes per batch, as stored: a batch also closes before the event that
    /// would take it past this, so memory follows this budget.
    #[arg(long, value_name = "BYTES", default_value_t = crate::context::BATCH_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_bytes: u64,
}

pub async fn run(ctx: &Context, args: &CatchUpArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let set = ctx.projectors(&config);
    let selected = ProjectorSet::new(select(&set, args.projector.as_deref())?)?;
    let pool = ctx.writable_pool(&config, 3).await?;
    let cancel = crate::progress::cancel_on_ctrl_c();
    let bars = Bars::new(!ctx.json());
    let options = ReplayOptions {
        batch_size: args.batch_size as usize,
        batch_bytes: crate::context::batch_bytes(args.batch_bytes),
        progress: Some(bars.callback()),
        ..ReplayOptions::default()
    };
    let outcomes =
        catch_up_configured(&pool, &selected, &config.event_store, &options, &cancel).await;
    bars.finish();
    let reports = coord::Steps::collect(
        "caught up",
        "projector versions",
        outcomes?.into_iter().map(|o| (o.label, o.result)),
    )?;
    if ctx.json() {
        return output::json(&serde_json::json!({ "projectors": reports }));
    }
    if reports.is_empty() {
        println!("nothing to catch up: no configured version is replaying or active");
    }
    for r in &reports {
        println!(
            "{}@{}: {} events applied, {} parked, in {} passes; {} left{}",
            r.projector,
            r.version,
            r.applied,
            r.parked,
            r.passes,
            r.remaining,
            if r.cancelled {
                "; interrupted, checkpoint saved"
            } else {
                ""
            }
        );
    }
    Ok(())
}
