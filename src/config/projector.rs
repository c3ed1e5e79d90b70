//! One `[[projector]]` entry of `coord.toml`: every field checked, every
//! problem collected (named by field), the SQL checked statically.

use std::collections::BTreeMap;

use semver::Version;
use serde::Deserialize;

use super::{BatchHandler, Mode, OnError, ProjectorConfig};
use crate::names::ProjectorName;
use crate::sql_check::{self, Expect};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProjector {
    #[allow(dead_code)] // read before this struct, kept so `name` is a known field
    name: toml::Value,
    version: Option<String>,
    mode: Option<String>,
    on_error: Option<String>,
    tables: Option<String>,
    verify: Option<Vec<String>>,
    handlers: Option<BTreeMap<String, String>>,
    batch_handlers: Option<BTreeMap<String, String>>,
    batch_checks: Option<BTreeMap<String, String>>,
}

/// A second, lenient reading of the file for what `toml::Table` forgets:
/// the order in which each projector's `batch_handlers` are written.
#[derive(Deserialize)]
struct OrderProbe {
    #[serde(default)]
    projector: Vec<ProjectorOrderProbe>,
}

#[derive(Deserialize)]
struct ProjectorOrderProbe {
    #[serde(default)]
    batch_handlers: BTreeMap<String, toml::Spanned<toml::Value>>,
}

/// The `batch_handlers` keys of every `[[projector]]`, in file order.
pub(super) fn batch_handler_order(text: &str) -> Vec<Vec<String>> {
    let Ok(probe) = toml::from_str::<OrderProbe>(text) else {
        return Vec::new();
    };
    probe
        .projector
        .into_iter()
        .map(|p| {
            let mut keys: Vec<(usize, String)> = p
                .batch_handlers
                .into_iter()
                .map(|(k, v)| (v.span().start, k))
                .collect();
            keys.sort();
            keys.into_iter().map(|(_, k)| k).collect()
        })
        .collect()
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn parse_projector(
    table: toml::Table,
    batch_order: Option<&[String]>,
) -> Result<ProjectorConfig, Vec<String>> {
    let mut problems = Vec::new();
    let name = match table.get("name") {
        Some(toml::Value::String(name)) => ProjectorName::new(name)
            .map_err(|e| problems.push(format!("field `name`: {e}")))
            .ok(),
        Some(other) => {
            problems.push(format!(
                "field `name`: expected a string, found {}",
                other.type_str()
            ));
            None
        }
        None => {
            problems.push("field `name`: missing".into());
            None
        }
    };
    let raw = match RawProjector::deserialize(toml::Value::Table(table)) {
        Ok(raw) => raw,
        Err(e) => {
            problems.push(one_line(&e.to_string()));
            return Err(problems);
        }
    };
    let version = match raw.version.as_deref() {
        None => {
            problems.push("field `version`: missing".into());
            None
        }
        Some(text) => Version::parse(text)
            .map_err(|e| {
                problems.push(format!(
                    "field `version`: {text:?} is not a semantic version (MAJOR.MINOR.PATCH): {e}"
                ))
            })
            .ok(),
    };
    let mode = one_of("mode", raw.mode.as_deref(), &MODES, &mut problems);
    let on_error = one_of(
        "on_error",
        raw.on_error.as_deref(),
        &ON_ERRORS,
        &mut problems,
    );
    let tables = match raw.tables {
        Some(tables) if !tables.trim().is_empty() => tables,
        Some(_) => {
            problems.push("field `tables`: empty; give the DDL of the projector's tables".into());
            String::new()
        }
        None => {
            problems.push("field `tables`: missing; give the DDL of the projector's tables".into());
            String::new()
        }
    };
    let handlers = raw.handlers.unwrap_or_default();
    let batch_handlers =
        ordered_batch_handlers(raw.batch_handlers.unwrap_or_default(), batch_order);
    if handlers.is_empty() && batch_handlers.is_empty() {
        problems.push(
            "field `handlers`: no handlers; add [projector.handlers] with one SQL statement per event type \
             (or [projector.batch_handlers] with one set-based statement per event type)"
                .into(),
        );
    }
    problems.extend(batch_handler_problems(&handlers, &batch_handlers));
    let batch_checks: Vec<BatchHandler> = raw
        .batch_checks
        .unwrap_or_default()
        .into_iter()
        .map(|(event_type, sql)| BatchHandler { event_type, sql })
        .collect();
    problems.extend(batch_check_problems(&batch_handlers, &batch_checks));
    for (event_type, sql) in &handlers {
        if let Err(e) = crate::names::check_event_type(event_type) {
            problems.push(format!("field `handlers`: {e}"));
        }
        if sql.trim().is_empty() {
            problems.push(format!(
                "field `handlers.{event_type}`: the SQL statement is empty"
            ));
        } else if let Err(e) = sql_check::check(sql, Expect::One) {
            problems.push(format!("field `handlers.{event_type}`: the SQL {e}"));
        }
    }
    if !tables.is_empty() {
        if let Err(e) = sql_check::check(&tables, Expect::Several) {
            problems.push(format!("field `tables`: the DDL {e}"));
        }
    }
    let verify = raw.verify.unwrap_or_default();
    for (i, sql) in verify.iter().enumerate() {
        if sql.trim().is_empty() {
            problems.push(format!("field `verify[{i}]`: the assertion is empty"));
        } else if let Err(e) = sql_check::check(sql, Expect::One) {
            problems.push(format!("field `verify[{i}]`: the assertion {e}"));
        }
    }
    match (name, version) {
        (Some(name), Some(version)) if problems.is_empty() => Ok(ProjectorConfig {
            name,
            version,
            mode,
            on_error,
            tables,
            verify,
            handlers,
            batch_handlers,
            batch_checks,
        }),
        _ => Err(problems),
    }
}

/// The values of `mode`, the default first.
const MODES: [(&str, Mode); 2] = [("inline", Mode::Inline), ("async", Mode::Async)];
/// The values of `on_error`, the default first.
const ON_ERRORS: [(&str, OnError); 2] = [("fail", OnError::Fail), ("park", OnError::Park)];

/// The choice named `given` (the first when absent); an unknown name is a
/// problem naming `field` and every choice.
fn one_of<T: Copy>(
    field: &str,
    given: Option<&str>,
    choices: &[(&str, T)],
    problems: &mut Vec<String>,
) -> T {
    let given = given.unwrap_or(choices[0].0);
    if let Some((_, choice)) = choices.iter().find(|(name, _)| *name == given) {
        return *choice;
    }
    let names: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    problems.push(format!(
        "field `{field}`: {given:?} is not one of {}",
        names.join(", ")
    ));
    choices[0].1
}

/// `batch_handlers` in the order the file lists them (`order`, when known).
fn ordered_batch_handlers(
    mut map: BTreeMap<String, String>,
    order: Option<&[String]>,
) -> Vec<BatchHandler> {
    let mut out = Vec::with_capacity(map.len());
    for key in order.unwrap_or_default() {
        if let Some(sql) = map.remove(key) {
            out.push(BatchHandler {
                event_type: key.clone(),
                sql,
            });
        }
    }
    out.extend(
        map.into_iter()
            .map(|(event_type, sql)| BatchHandler { event_type, sql }),
    );
    out
}

fn batch_handler_problems(
    handlers: &BTreeMap<String, String>,
    batch_handlers: &[BatchHandler],
) -> Vec<String> {
    let mut problems = Vec::new();
    for BatchHandler { event_type, sql } in batch_handlers {
        let field = format!("field `batch_handlers.{event_type}`");
        if event_type.trim().is_empty() {
            problems.push("field `batch_handlers`: an event type is empty".into());
        }
        if handlers.contains_key(event_type) {
            problems.push(format!(
                "{field}: event type {event_type} also has a per-event handler in `handlers`; \
                 give each event type either a per-event or a batch handler, not both"
            ));
        }
        if sql.trim().is_empty() {
            problems.push(format!("{field}: the SQL statement is empty"));
        } else if has_parameter(sql) {
            problems.push(format!(
                "{field}: batch statements take no $n parameters; read the events from the \
                 relation `batch_events` (columns stream_id, stream_version, position, \
                 event_type, data, metadata, recorded_at)"
            ));
        }
    }
    problems
}

fn batch_check_problems(batch_handlers: &[BatchHandler], checks: &[BatchHandler]) -> Vec<String> {
    let mut problems = Vec::new();
    for BatchHandler { event_type, sql } in checks {
        let field = format!("field `batch_checks.{event_type}`");
        if !batch_handlers.iter().any(|h| &h.event_type == event_type) {
            problems.push(format!(
                "{field}: event type {event_type:?} has no batch handler in `batch_handlers`; \
                 a check runs before its event type's batch handler"
            ));
        }
        if sql.trim().is_empty() {
            problems.push(format!("{field}: the query is empty"));
        } else if has_parameter(sql) {
            problems.push(format!(
                "{field}: checks take no $n parameters; read the events from the relation \
                 `batch_events`"
            ));
        } else if let Err(e) =
            sql_check::check(sql, Expect::One).and_then(|()| sql_check::check_query(sql))
        {
            problems.push(format!(
                "{field}: the check {e}; give a query returning (position, message) for each \
                 event of `batch_events` that must not be applied"
            ));
        }
    }
    problems
}

/// Whether `sql` contains a positional parameter (`$` followed by a digit;
/// dollar-quote tags cannot start with a digit).
fn has_parameter(sql: &str) -> bool {
    sql.as_bytes()
        .windows(2)
        .any(|w| w[0] == b'$' && w[1].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::{MODES, ON_ERRORS};

    #[test]
    fn the_choices_are_spelled_as_the_enums_print_them() {
        for (name, mode) in MODES {
            assert_eq!(mode.as_str(), name);
        }
        for (name, on_error) in ON_ERRORS {
            assert_eq!(on_error.as_str(), name);
        }
    }
}
