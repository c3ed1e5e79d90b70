//! `coord abort`: drop replays in progress; active versions are untouched.

use crate::context::Context;
use crate::output;

/// Arguments of `coord abort`.
#[derive(Debug, clap::Args)]
pub struct AbortArgs {
    /// Abort only this projector's replay (default: every replay in progress).
    #[arg(long, value_name = "NAME")]
    pub projector: Option<String>,
    /// Also drop objects outside coord's schemas that depend on the dropped schema.
    #[arg(long)]
    pub cascade: bool,
}

pub async fn run(ctx: &Context, args: &AbortArgs) -> anyhow::Result<()> {
    let config = ctx.optional_config()?;
    let mut client = ctx.connect(config.as_ref()).await?;
    coord::ensure_writable(&client).await?;
    let names: Vec<String> = match &args.projector {
        Some(name) => vec![name.clone()],
        None => coord::records::in_progress(&client)
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect(),
    };
    let mut reports = Vec::new();
    for name in &names {
        reports.push(
            coord::activation::abort_projector(
                &mut client,
                name,
                &ctx.actor,
                coord::Dependents::cascade_if(args.cascade),
            )
            .await?,
        );
    }
    if ctx.json() {
        return output::json(&serde_json::json!({ "aborted": reports }));
    }
    if reports.is_empty() {
        println!("nothing to abort: no replay in progress");
    }
    for r in &reports {
        println!(
            "aborted the replay of {}@{}: dropped schema {}; the active version is untouched",
            r.projector, r.version, r.schema
        );
    }
    Ok(())
}
