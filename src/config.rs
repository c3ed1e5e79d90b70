//! `coord.toml`: parsing into validated types. Reads a file when asked to;
//! never touches the database or the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::names::{ProjectorName, RelationName};
use crate::sql_check::{self, Expect};
use crate::url_redact::redact;

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

/// A PostgreSQL connection URL whose `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Validates a URL or key=value connection string.
    ///
    /// # Errors
    /// A message (without the password) when PostgreSQL's client cannot parse it.
    pub fn parse(url: &str) -> Result<Self, String> {
        crate::db::parse_pg_config(url).map_err(|e| {
            format!("invalid database URL (not shown: it may hold a password): {e}")
        })?;
        Ok(Self(url.to_owned()))
    }

    /// The full URL, password included: pass it to a client, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection settings.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        crate::db::parse_pg_config(&self.0).expect("validated in DatabaseUrl::parse")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", redact(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// Picks the database URL: `--database-url` or `DATABASE_URL` (the caller
/// passes whichever it has, flag first), else the configuration file's.
///
/// # Errors
/// [`crate::Error::InvalidInput`] when none is given or the given one is invalid.
pub fn resolve_database_url(
    given: Option<&str>,
    config: Option<&Config>,
) -> crate::Result<DatabaseUrl> {
    match (given, config.and_then(|c| c.database_url.clone())) {
        (Some(url), _) => DatabaseUrl::parse(url).map_err(crate::Error::InvalidInput),
        (None, Some(url)) => Ok(url),
        (None, None) => Err(crate::Error::InvalidInput(
            "no database URL: pass --database-url, set DATABASE_URL, or set database_url in the configuration".into(),
        )),
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
}

/// One entry of `[projector.batch_handlers]`: a statement run once per batch
/// over the relation `batch_events` holding the batch's events of
/// `event_type` (docs/decisions/0015-set-based-batch-handlers.md).
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventStore {
    relation: Option<String>,
}

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
fn batch_handler_order(text: &str) -> Vec<Vec<String>> {
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
        })
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_projector(
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
    let mode = match raw.mode.as_deref() {
        None | Some("inline") => Mode::Inline,
        Some("async") => Mode::Async,
        Some(other) => {
            problems.push(format!(
                "field `mode`: {other:?} is not one of \"inline\", \"async\""
            ));
            Mode::Inline
        }
    };
    let on_error = match raw.on_error.as_deref() {
        None | Some("fail") => OnError::Fail,
        Some("park") => OnError::Park,
        Some(other) => {
            problems.push(format!(
                "field `on_error`: {other:?} is not one of \"fail\", \"park\""
            ));
            OnError::Fail
        }
    };
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
        }),
        _ => Err(problems),
    }
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

/// Whether `sql` contains a positional parameter (`$` followed by a digit;
/// dollar-quote tags cannot start with a digit).
fn has_parameter(sql: &str) -> bool {
    sql.as_bytes()
        .windows(2)
        .any(|w| w[0] == b'$' && w[1].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
database_url = "postgres://app:s3cret@db.example:5432/bank"

[event_store]
relation = "coord.events"

[[projector]]
name = "balances"
version = "2.0.0"
mode = "inline"
on_error = "park"
tables = "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);"
verify = ["SELECT count(*) > 0 FROM balances"]

[projector.handlers]
AccountOpened = "INSERT INTO balances (account) VALUES ($1)"
"#;

    fn problems(text: &str) -> Vec<String> {
        Config::parse(text, "coord.toml").unwrap_err().problems
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(VALID.contains(replace), "{replace}");
        VALID.replace(replace, by)
    }

    #[test]
    fn parses_the_design_example() {
        let config = Config::parse(VALID, "coord.toml").unwrap();
        let p = &config.projectors[0];
        assert_eq!(p.name.as_str(), "balances");
        assert_eq!(p.version, Version::new(2, 0, 0));
        assert_eq!(p.on_error, OnError::Park);
        assert_eq!(p.handlers.len(), 1);
        assert_eq!(config.event_store.to_string(), "coord.events");
    }

    #[test]
    fn debug_and_display_hide_the_password() {
        let config = Config::parse(VALID, "coord.toml").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("app:***@db.example"), "{debug}");
        let url = config.database_url.unwrap();
        assert!(!url.to_string().contains("s3cret"));
        assert_eq!(url.expose(), "postgres://app:s3cret@db.example:5432/bank");
        let kv = DatabaseUrl::parse("host=localhost password=hunter2 user=x").unwrap();
        assert!(!format!("{kv:?}").contains("hunter2"));
    }

    #[test]
    fn the_given_url_wins_over_the_file() {
        let config = Config::parse(VALID, "coord.toml").unwrap();
        let url =
            resolve_database_url(Some("postgres://postgres@127.0.0.1/x"), Some(&config)).unwrap();
        assert_eq!(url.expose(), "postgres://postgres@127.0.0.1/x");
        let url = resolve_database_url(None, Some(&config)).unwrap();
        assert!(url.expose().contains("db.example"));
        assert!(resolve_database_url(None, None).is_err());
    }

    #[test]
    fn invalid_semver_names_projector_and_field() {
        let p = problems(&with("\"2.0.0\"", "\"2.0\""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "projector balances: field `version`: \"2.0\" is not a semantic version"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn invalid_name_is_refused() {
        let p = problems(&with("name = \"balances\"", "name = \"Bal-ances\""));
        assert!(
            p[0].starts_with("projector Bal-ances: field `name`: invalid projector name"),
            "{p:?}"
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let twice = format!(
            "{VALID}\n{}",
            &VALID[VALID.find("[[projector]]").unwrap()..]
        );
        let p = problems(&twice);
        assert_eq!(
            p,
            vec!["projector balances: field `name`: projector balances is defined more than once"]
        );
    }

    #[test]
    fn missing_handlers_and_tables_are_refused() {
        let text = with(
            "[projector.handlers]\nAccountOpened = \"INSERT INTO balances (account) VALUES ($1)\"\n",
            "",
        );
        let text = text.replace(
            "tables = \"CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);\"\n",
            "",
        );
        let p = problems(&text);
        assert!(
            p.iter()
                .any(|m| m.starts_with("projector balances: field `tables`: missing")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("projector balances: field `handlers`: no handlers")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_mode_and_on_error_are_refused() {
        let p = problems(&with("mode = \"inline\"", "mode = \"sync\""));
        assert_eq!(
            p,
            vec!["projector balances: field `mode`: \"sync\" is not one of \"inline\", \"async\""]
        );
        let p = problems(&with("on_error = \"park\"", "on_error = \"skip\""));
        assert_eq!(
            p,
            vec!["projector balances: field `on_error`: \"skip\" is not one of \"fail\", \"park\""]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let p = problems(&with(
            "mode = \"inline\"",
            "mode = \"inline\"\ncolour = \"red\"",
        ));
        assert!(
            p[0].starts_with("projector balances: unknown field `colour`"),
            "{p:?}"
        );
        let p = problems(&format!("verbose = true\n{VALID}"));
        assert!(p[0].contains("unknown field `verbose`"), "{p:?}");
        let p = problems(&with(
            "relation = \"coord.events\"",
            "relation = \"coord.events\"\ntable = \"x\"",
        ));
        assert!(p[0].contains("unknown field `table`"), "{p:?}");
    }

    #[test]
    fn bad_relation_and_url_are_refused() {
        let p = problems(&with("\"coord.events\"", "\"coord.events; drop table x\""));
        assert!(
            p[0].starts_with("field `event_store.relation`: invalid relation"),
            "{p:?}"
        );
        let p = problems(&with(
            "postgres://app:s3cret@db.example:5432/bank",
            "postgres://app:s3cret@db:notaport/x",
        ));
        assert!(
            p[0].starts_with("field `database_url`: invalid database URL"),
            "{p:?}"
        );
        assert!(!p[0].contains("s3cret"), "{p:?}");
    }

    #[test]
    fn an_empty_file_is_refused() {
        assert_eq!(
            problems(""),
            vec!["no [[projector]] entries: configure at least one projector"]
        );
        assert!(problems("[[projector").len() == 1);
    }

    #[test]
    fn batch_handlers_keep_file_order_and_cannot_share_a_type_with_handlers() {
        let text = with(
            "[projector.handlers]",
            "[projector.batch_handlers]\nZeta = \"SELECT 1 FROM batch_events\"\n\
             Alpha = \"SELECT 2 FROM batch_events\"\n[projector.handlers]",
        );
        let config = Config::parse(&text, "coord.toml").unwrap();
        let order: Vec<&str> = config.projectors[0]
            .batch_handlers
            .iter()
            .map(|h| h.event_type.as_str())
            .collect();
        assert_eq!(order, ["Zeta", "Alpha"]);

        let text = with(
            "[projector.handlers]",
            "[projector.batch_handlers]\nAccountOpened = \"SELECT 1 FROM batch_events\"\n[projector.handlers]",
        );
        assert_eq!(
            problems(&text),
            vec![
                "projector balances: field `batch_handlers.AccountOpened`: event type AccountOpened \
                 also has a per-event handler in `handlers`; give each event type either a \
                 per-event or a batch handler, not both"
            ]
        );
    }

    #[test]
    fn errors_name_the_file() {
        let err = Config::parse("x = 1", "deploy/coord.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration deploy/coord.toml: "),
            "{err}"
        );
    }
}
