//! `coord run`: keep every active version up to date.

use crate::context::Context;
use crate::output;

pub async fn run(ctx: &Context) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, 4)?;
    let cancel = crate::progress::cancel_on_ctrl_c();
    let projectors = ctx.projectors(&config);
    let options = coord::RunOptions::default();
    if !ctx.json() {
        eprintln!(
            "coord run: following the active versions (async ones fully, inline ones for what bypassed their publishers); Ctrl-C stops at a batch boundary"
        );
    }
    let exits = coord::run_projectors(
        &pool,
        &url,
        &projectors,
        &config.event_store,
        &options,
        &cancel,
    )
    .await?;
    if ctx.json() {
        return output::json(&exits);
    }
    for exit in exits {
        println!(
            "{}: applied {} events; stopped: {}",
            exit.projector, exit.applied, exit.reason
        );
    }
    Ok(())
}
