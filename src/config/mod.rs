//! `coord.toml`: parsing into validated types. Reads a file when asked to;
//! never touches the database or the environment. The file's top level and
//! the types live here; [`DatabaseUrl`] in `url.rs`, the checks of one
//! `[[projector]]` entry in `projector.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::names::{ProjectorName, RelationName};

mod projector;
mod url;

pub use url::{resolve_database_url, DatabaseUrl};

use projector::{batch_handler_order, parse_projector};

/// How a projector's active version is kept up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Its handlers run inside every publishing transaction.
    Inline,
    /// `coord run` tails the event store and applies new events.
    Async,
}

impl Mode {
    /// `inline` or `async`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Async => "async",
        }
    }
}

/// What a replay does with an event whose handler fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop with the checkpoint just before the failing event.
    Fail,
    /// Record the event and the error in `coord.parked_events` and go on.
    Park,
}

impl OnError {
    /// `fail` or `park`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Fail => "fail",
            OnError::Park => "park",
        }
    }
}

/// A validated `coord.toml`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from (a path), for messages.
    pub source_name: String,
    /// `database_url`, if the file has one.
    pub database_url: Option<DatabaseUrl>,
    /// `[event_store] relation`: the table or view events are read from.
    pub event_store: RelationName,
    /// The `[[projector]]` entries, in file order.
    pub projectors: Vec<ProjectorConfig>,
    /// `[privileges]`: application roles granted access to every version's
    /// schema and tables when it is registered.
    pub privileges: crate::privileges::Privileges,
}

/// One `[[projector]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectorConfig {
    /// `name`.
    pub name: ProjectorName,
    /// `version`.
    pub version: Version,
    /// `mode` (default `inline`).
    pub mode: Mode,
    /// `on_error` (default `fail`).
    pub on_error: OnError,
    /// `tables`: DDL run in the version's own schema.
    pub tables: String,
    /// `verify`: SQL assertions that must each return true before activation.
    pub verify: Vec<String>,
    /// `[projector.handlers]`: event type to SQL statement, run once per event.
    pub handlers: BTreeMap<String, String>,
    /// `[projector.batch_handlers]`: set-based statements, each run once per
    /// batch over the batch's events of its type, in the order the file
    /// lists them (see [`BatchHandler`]).
    pub batch_handlers: Vec<BatchHandler>,
    /// `[projector.batch_checks]`: per event type with a batch handler, a
    /// query over `batch_events` returning `(position, message)` for each
    /// event that must not be applied; run before the batch handlers, it
    /// names the failing events so that `on_error = "park"` parks them
    /// without searching the batch (see [`BatchHandler`],
    /// docs/decisions/0089-set-based-checks-name-failing-events.md). Sorted
    /// by event type.
    pub batch_checks: Vec<BatchHandler>,
}

/// One entry of `[projector.batch_handlers]` (or `[projector.batch_checks]`):
/// a statement run once per batch over the relation `batch_events` holding
/// the batch's events of `event_type`
/// (docs/decisions/0015-set-based-batch-handlers.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHandler {
    /// The event type.
    pub event_type: String,
    /// The SQL statement (no `$n` parameters).
    pub sql: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database_url: Option<String>,
    event_store: Option<RawEventStore>,
    #[serde(default)]
    projector: Vec<toml::Table>,
    privileges: Option<RawPrivileges>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivileges {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventStore {
    relation: Option<String>,
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and every problem.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![format!("cannot read it: {e}")],
        })?;
        Self::parse(&text, &source_name)
    }

    /// Parses and validates configuration text; `source_name` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the source and every problem.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            source_name: source_name.to_owned(),
            problems,
        };
        let raw: RawConfig =
            // The parser's message keeps its line, column and caret.
            toml::from_str(text).map_err(|e| fail(vec![e.to_string().trim_end().to_owned()]))?;
        let mut problems = Vec::new();

        let database_url = raw.database_url.as_deref().and_then(|url| {
            DatabaseUrl::parse(url)
                .map_err(|e| problems.push(format!("field `database_url`: {e}")))
                .ok()
        });
        let event_store = match raw.event_store.and_then(|e| e.relation) {
            None => RelationName::default(),
            Some(relation) => RelationName::parse(&relation).unwrap_or_else(|e| {
                problems.push(format!("field `event_store.relation`: {e}"));
                RelationName::default()
            }),
        };

        let privileges = raw.privileges.map_or_else(Default::default, |p| {
            crate::privileges::Privileges::parse(&p.read, &p.write).unwrap_or_else(|e| {
                problems.extend(e);
                Default::default()
            })
        });
        let mut projectors = Vec::new();
        let mut seen = BTreeSet::new();
        let orders = batch_handler_order(text);
        for (index, table) in raw.projector.into_iter().enumerate() {
            let label = match table.get("name") {
                Some(toml::Value::String(name)) => format!("projector {name}"),
                _ => format!("projector #{}", index + 1),
            };
            match parse_projector(table, orders.get(index).map(Vec::as_slice)) {
                Ok(projector) => {
                    if !seen.insert(projector.name.clone()) {
                        problems.push(format!(
                            "{label}: field `name`: projector {} is defined more than once",
                            projector.name
                        ));
                    }
                    projectors.push(projector);
                }
                Err(errors) => problems.extend(errors.into_iter().map(|e| format!("{label}: {e}"))),
            }
        }
        if projectors.is_empty() && problems.is_empty() {
            problems.push("no [[projector]] entries: configure at least one projector".into());
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(Config {
            source_name: source_name.to_owned(),
            database_url,
            event_store,
            projectors,
            privileges,
        })
    }
}

#[cfg(test)]
mod tests;
