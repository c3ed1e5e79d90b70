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
}

pub async fn run(ctx: &Context, args: &CatchUpArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let set = ctx.projectors(&config);
    let selected = ProjectorSet::new(select(&set, args.projector.as_deref())?)?;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, 3)?;
    {
        let client = pool.get().await.map_err(coord::Error::from)?;
        coord::ensure_writable(&**client).await?;
        coord::check_event_store(&**client, &config.event_store).await?;
    }
    let cancel = crate::progress::cancel_on_ctrl_c();
    let bars = Bars::new(!ctx.json());
    let options = ReplayOptions {
        batch_size: args.batch_size as usize,
        progress: Some(bars.callback()),
        ..ReplayOptions::default()
    };
    let outcomes =
        catch_up_configured(&pool, &selected, &config.event_store, &options, &cancel).await;
    bars.finish();
    let outcomes = outcomes?;
    let total = outcomes.len();
    let mut reports = Vec::new();
    let mut failure = None;
    for outcome in outcomes {
        match outcome.result {
            Ok(r) => reports.push(r),
            Err(e) if failure.is_none() => failure = Some((outcome.label, e)),
            Err(e) => tracing::error!(projector = %outcome.label, error = %e, "catch-up failed"),
        }
    }
    if let Some((label, e)) = failure {
        return Err(anyhow::Error::from(e).context(format!(
            "caught up {} of {total} projector versions; {label} failed",
            reports.len()
        )));
    }
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
