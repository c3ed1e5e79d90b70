//! `coord status`.

use coord::RelationName;

use crate::context::Context;
use crate::output::{self, opt, Table};

pub async fn run(ctx: &Context) -> anyhow::Result<()> {
    let config = ctx.optional_config()?;
    let client = ctx.connect(config.as_ref()).await?;
    let relation = config
        .as_ref()
        .map_or_else(RelationName::default, |c| c.event_store.clone());
    let report = coord::status(&client, &relation).await?;
    if ctx.json() {
        return output::json(&report);
    }
    print!("{}", render(&report));
    Ok(())
}

pub fn render(report: &coord::StatusReport) -> String {
    if report.projectors.is_empty() {
        return format!(
            "no projectors yet (event store head at position {}); run `coord activate-current-config`\n",
            report.head_position
        );
    }
    let mut states = Table::new(&[
        "PROJECTOR",
        "ACTIVE",
        "ACTIVATING",
        "REPLAYING",
        "LAST TRANSITION",
    ]);
    for p in &report.projectors {
        let last = p.last_transition.as_ref().map(|t| {
            format!(
                "{} {} at {} by {} ({})",
                t.to_status,
                t.version.as_deref().unwrap_or("-"),
                t.at,
                t.host,
                t.command
            )
        });
        states.row(vec![
            p.name.clone(),
            opt(p.active_version.as_deref()),
            opt(p.activating_version.as_deref()),
            opt(p.replaying_version.as_deref()),
            opt(last),
        ]);
    }
    let mut versions = Table::new(&[
        "PROJECTOR",
        "VERSION",
        "STATUS",
        "SCHEMA",
        "POSITION",
        "LAG",
        "INLINE",
        "CATCH-UP",
        "PARKED",
        "RATE/S",
        "ETA",
        "LAST ERROR",
    ]);
    for p in &report.projectors {
        for v in &p.versions {
            let r = &v.record;
            versions.row(vec![
                r.name.clone(),
                r.version.clone(),
                r.status.to_string(),
                r.schema_name.clone(),
                v.position.to_string(),
                lag_text(v),
                v.applied_inline.to_string(),
                v.applied_by_catch_up.to_string(),
                r.events_parked.to_string(),
                opt(r.rate_per_s.map(|x| format!("{x:.0}"))),
                opt(r.eta_s.map(|x| format!("{x:.0}s"))),
                opt(r
                    .last_error
                    .as_deref()
                    .map(|e| e.lines().next().unwrap_or("").to_owned())),
            ]);
        }
    }
    format!(
        "event store head: position {}\n\n{}\n{}",
        report.head_position,
        states.render(),
        versions.render()
    )
}

/// `0`, `-` when not followed, or `12 BEHIND (3s)` so a lagging version
/// stands out.
fn lag_text(v: &coord::VersionStatusReport) -> String {
    match (v.lag, v.lag_seconds) {
        (None, _) => "-".into(),
        (Some(0), _) => "0".into(),
        (Some(n), Some(secs)) => format!("{n} BEHIND ({secs:.0}s)"),
        (Some(n), None) => format!("{n} BEHIND"),
    }
}
