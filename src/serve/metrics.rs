//! `/metrics`: a [`StatusReport`] in Prometheus' text exposition format.
//! Pure formatting: no database, no I/O.

use std::fmt::Write as _;

use crate::status::{StatusReport, VersionStatusReport};

/// The metrics when coord's state cannot be read: `coord_up 0`, `coord_ready 0`.
pub(super) fn render_down() -> String {
    let mut out = String::new();
    up_and_ready(&mut out, false, false);
    out
}

/// `coord_up` (1: the state was read for this scrape) and `coord_ready`.
fn up_and_ready(out: &mut String, up: bool, ready: bool) {
    gauge(
        out,
        "coord_up",
        "1 when coord read its state from the database for this scrape, else 0.",
    );
    line(out, "coord_up", &[], u8::from(up));
    gauge(
        out,
        "coord_ready",
        "1 while this configuration may publish, else 0.",
    );
    line(out, "coord_ready", &[], u8::from(ready));
}

/// How a per-version gauge reads its value (`None`: no sample).
type VersionGauge = fn(&VersionStatusReport) -> Option<f64>;

/// The per-version gauges (labels `projector`, `version`, `status`), in the
/// order they are rendered: name, help, value.
const PER_VERSION: [(&str, &str, VersionGauge); 8] = [
    (
        "coord_projector_events_processed",
        "Events a projector version applied.",
        |v| Some(v.record.events_processed as f64),
    ),
    (
        "coord_projector_events_parked",
        "Events a projector version parked after its handler failed.",
        |v| Some(v.record.events_parked as f64),
    ),
    (
        "coord_projector_lag",
        "Committed events a followed projector version has not applied yet (same as coord_projector_lag_events).",
        |v| v.lag.map(|l| l as f64),
    ),
    (
        "coord_projector_lag_events",
        "Committed events a followed projector version has not applied yet.",
        |v| v.lag.map(|l| l as f64),
    ),
    (
        "coord_projector_lag_seconds",
        "Age of the oldest event a followed projector version has not applied (0 when none).",
        |v| v.lag.map(|_| v.lag_seconds.unwrap_or(0.0)),
    ),
    (
        "coord_projector_position",
        "Highest position a projector version applied (replay, catch-up or inline).",
        |v| Some(v.position as f64),
    ),
    (
        "coord_projector_applied_inline",
        "Events a projector version's publishers applied inline.",
        |v| Some(v.applied_inline as f64),
    ),
    (
        "coord_projector_applied_catch_up",
        "Events a projector version applied by replay and catch-up passes.",
        |v| Some(v.applied_by_catch_up as f64),
    ),
];

/// Renders `report` and `ready` in Prometheus' text exposition format:
/// `coord_up` (1: the state was read), `coord_ready`, `coord_event_store_head_position`, and per projector
/// version (labels `projector`, `version`, `status`)
/// `coord_projector_events_processed`, `coord_projector_events_parked`,
/// `coord_projector_lag` and `coord_projector_lag_events` (events not yet
/// applied, for followed versions), `coord_projector_lag_seconds`,
/// `coord_projector_position`, `coord_projector_applied_inline`,
/// `coord_projector_applied_catch_up`, and `coord_projector_active`
/// (labels `projector`, `version`; 1 for the active version, else 0).
///
/// Counts are exact up to 2^53 (they are rendered as `f64`).
pub fn render_metrics(report: &StatusReport, ready: bool) -> String {
    let mut out = String::new();
    up_and_ready(&mut out, true, ready);
    gauge(
        &mut out,
        "coord_event_store_head_position",
        "Highest position in the event store.",
    );
    line(
        &mut out,
        "coord_event_store_head_position",
        &[],
        report.head_position,
    );

    let versions = || report.projectors.iter().flat_map(|p| p.versions.iter());
    let labels = |v: &VersionStatusReport| {
        [
            ("projector", v.record.name.clone()),
            ("version", v.record.version.clone()),
            ("status", v.record.status.as_str().to_owned()),
        ]
    };
    for (name, help, value) in PER_VERSION {
        gauge(&mut out, name, help);
        for v in versions() {
            if let Some(x) = value(v) {
                line(&mut out, name, &labels(v), x);
            }
        }
    }
    gauge(
        &mut out,
        "coord_projector_active",
        "1 for the active version of a projector, else 0.",
    );
    for p in &report.projectors {
        let mut seen: Vec<&str> = p
            .versions
            .iter()
            .map(|v| v.record.version.as_str())
            .collect();
        // The state row can name an active version coord has no record of
        // (set by hand or by an older coord): report it too.
        if let Some(active) = p.active_version.as_deref() {
            if !seen.contains(&active) {
                seen.push(active);
            }
        }
        for version in seen {
            let active = p.active_version.as_deref() == Some(version);
            line(
                &mut out,
                "coord_projector_active",
                &[
                    ("projector", p.name.clone()),
                    ("version", version.to_owned()),
                ],
                u8::from(active),
            );
        }
    }
    out
}

fn gauge(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

fn line(out: &mut String, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A label value escaped per the text exposition format: backslash, double
/// quote and line feed.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::{escape_label, line};

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("a\nb"), r"a\nb");
        assert_eq!(escape_label("1.0.0-rc.1+x"), "1.0.0-rc.1+x");
    }

    #[test]
    fn counts_render_as_integers() {
        let mut out = String::new();
        line(&mut out, "c", &[("projector", "a".into())], 123_456_789_f64);
        line(&mut out, "s", &[], 0.25);
        assert_eq!(out, "c{projector=\"a\"} 123456789\ns 0.25\n");
    }
}
