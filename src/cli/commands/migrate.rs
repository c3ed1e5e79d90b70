//! `coord migrate`.

use crate::context::Context;
use crate::output;

pub async fn run(ctx: &Context) -> anyhow::Result<()> {
    let config = ctx.optional_config()?;
    let mut client = ctx.connect(config.as_ref()).await?;
    let report = coord::migrate(&mut client).await?;
    if ctx.json() {
        return output::json(&report);
    }
    if report.applied.is_empty() {
        println!("coord schema is up to date; no migration applied");
    } else {
        for name in &report.applied {
            println!("applied {name}");
        }
    }
    Ok(())
}
