//! `coord check`: may this configuration publish now?

use clap::Args;
use coord::Publisher;

use crate::context::Context;
use crate::output;

/// Arguments of `coord check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only these event types (repeatable); default: any type.
    #[arg(long = "event-type", value_name = "TYPE")]
    pub event_types: Vec<String>,
}

pub async fn run(ctx: &Context, args: CheckArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let mut client = ctx.connect(Some(&config)).await?;
    coord::ensure_migrated(&client).await?;
    let publisher = Publisher::new(ctx.projectors(&config));
    let types = (!args.event_types.is_empty()).then_some(args.event_types.as_slice());
    let tx = client.transaction().await?;
    let inline = publisher.check(&tx, types).await;
    tx.rollback().await?;
    let inline = inline?;
    if ctx.json() {
        return output::json(&serde_json::json!({ "may_publish": true, "inline": inline }));
    }
    println!("this configuration may publish");
    if !inline.is_empty() {
        println!("runs inline: {}", inline.join(", "));
    }
    Ok(())
}
