//! `coord catch-up`: catch the configuration's replaying versions up.

use coord::replay::{catch_up, ReplayOptions};
use coord::store::states;

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
    let selected = select(&set, args.projector.as_deref())?;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, 3)?;
    let mut replaying = Vec::new();
    {
        let client = pool.get().await.map_err(coord::Error::from)?;
        coord::ensure_writable(&**client).await?;
        coord::check_event_store(&**client, &config.event_store).await?;
        for p in selected {
            let state = states::get(&**client, p.name().as_str(), false).await?;
            let version = p.version().to_string();
            if state.and_then(|s| s.replaying_version).as_deref() == Some(version.as_str()) {
                replaying.push(p);
            }
        }
    }
    let cancel = crate::progress::cancel_on_ctrl_c();
    let bars = Bars::new(!ctx.json());
    let options = ReplayOptions {
        batch_size: args.batch_size as usize,
        progress: Some(bars.callback()),
        ..ReplayOptions::default()
    };
    let mut reports = Vec::new();
    for p in &replaying {
        let report = catch_up(&pool, p.as_ref(), &config.event_store, &options, &cancel).await;
        match report {
            Ok(r) => reports.push(r),
            Err(e) => {
                bars.finish();
                return Err(anyhow::Error::from(e).context(format!(
                    "caught up {} of {} projectors; {}@{} failed",
                    reports.len(),
                    replaying.len(),
                    p.name(),
                    p.version()
                )));
            }
        }
    }
    bars.finish();
    if ctx.json() {
        return output::json(&serde_json::json!({ "projectors": reports }));
    }
    if reports.is_empty() {
        println!("nothing is replaying: run `coord replay` first");
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
