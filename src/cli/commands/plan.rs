//! `coord plan`: what `activate-current-config` would do; writes nothing.

use coord::activation::{self, Action};

use crate::context::Context;
use crate::output::{self, Table};

pub async fn run(ctx: &Context) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let client = ctx.connect(Some(&config)).await?;
    let plan = activation::plan(&client, &ctx.projectors(&config), &config.event_store).await?;
    if ctx.json() {
        return output::json(&plan);
    }
    print!("{}", render(&plan));
    let refusals = plan.refusals();
    if !refusals.is_empty() {
        return Err(coord::Error::Refused(refusals.join("; ")).into());
    }
    Ok(())
}

/// The words for a step, shared by `plan` and `activate-current-config`.
pub fn describe(step: &activation::Step) -> String {
    let action = match &step.action {
        Action::NoChange => "no change".to_owned(),
        Action::Bootstrap => "bootstrap: replay from the start, then activate".to_owned(),
        Action::Replay { from } => format!("replay beside {from}, then activate"),
        Action::ResumeReplay => "resume the replay, then activate".to_owned(),
        Action::ResumeActivation => "finish the interrupted activation".to_owned(),
        Action::Reactivate { from } => format!(
            "catch up and re-activate (no replay){}",
            from.as_deref()
                .map(|f| format!(", retiring {f}"))
                .unwrap_or_default()
        ),
        Action::Retire { version } => format!("retire {version} (no longer configured)"),
        Action::Refuse { reason } => format!("REFUSED: {reason}"),
    };
    match &step.abandons_replay_of {
        Some(other) => format!("{action}; abandons the replay of {other}"),
        None => action,
    }
}

pub fn render(plan: &activation::Plan) -> String {
    let mut table = Table::new(&["PROJECTOR", "VERSION", "ACTION", "EVENTS"]);
    for step in &plan.steps {
        let action = describe(step);
        table.row(vec![
            step.projector.clone(),
            step.version.clone().unwrap_or_else(|| "-".into()),
            action,
            step.events_to_process.to_string(),
        ]);
    }
    let mut out = table.render();
    if plan.is_no_op() {
        out.push_str("nothing to do: every configured version is active\n");
    }
    out
}
