//! `coord.projector_versions`: what coord knows about each projector version
//! (status, schema, fingerprint, counters, progress, timings, last error).

use std::fmt;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

use crate::config::Mode;
use crate::{Error, Result};

fn parse_mode(text: &str) -> Result<Mode> {
    match text {
        "inline" => Ok(Mode::Inline),
        "async" => Ok(Mode::Async),
        other => Err(Error::Failed(format!(
            "unknown mode {other:?} in coord.projector_versions"
        ))),
    }
}

/// Lifecycle of a projector version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionStatus {
    /// Being built (or caught up) in its schema.
    Replaying,
    /// In the critical section of activation.
    Activating,
    /// Serving.
    Active,
    /// Was active, a newer version (or none) took over; its schema stays until pruned.
    Retired,
    /// Its replay was dropped.
    Aborted,
    /// Its schema was dropped by `coord prune`.
    Pruned,
}

impl VersionStatus {
    /// The text stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replaying => "replaying",
            Self::Activating => "activating",
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Aborted => "aborted",
            Self::Pruned => "pruned",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "replaying" => Self::Replaying,
            "activating" => Self::Activating,
            "active" => Self::Active,
            "retired" => Self::Retired,
            "aborted" => Self::Aborted,
            "pruned" => Self::Pruned,
            other => {
                return Err(Error::Failed(format!(
                    "unknown version status {other:?} in coord.projector_versions"
                )))
            }
        })
    }
}

impl PartialEq<&str> for VersionStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for VersionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `coord.projector_versions` (the checkpoint internals excepted).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VersionRecord {
    /// Projector name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Status.
    pub status: VersionStatus,
    /// Its schema.
    pub schema_name: String,
    /// Fingerprint of its definition.
    pub fingerprint: String,
    /// Event types it handles.
    pub event_types: Vec<String>,
    /// Inline or async.
    pub mode: Mode,
    /// Highest position applied by replay or catch-up.
    pub last_position: i64,
    /// Events applied.
    pub events_processed: i64,
    /// Events a handler declined.
    pub events_skipped: i64,
    /// Events parked after a handler failed.
    pub events_parked: i64,
    /// Events the replay expects to process in all, if known.
    pub events_total: Option<i64>,
    /// Recent replay rate, events per second.
    pub rate_per_s: Option<f64>,
    /// Estimated seconds left.
    pub eta_s: Option<f64>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Timestamps, ISO 8601 UTC.
    pub created_at: String,
    /// When its replay started.
    pub replay_started_at: Option<String>,
    /// When its replay last caught up.
    pub replay_finished_at: Option<String>,
    /// When it became active.
    pub activated_at: Option<String>,
    /// When it was retired.
    pub retired_at: Option<String>,
    /// Last change.
    pub updated_at: String,
}

impl TryFrom<&Row> for VersionRecord {
    type Error = Error;
    fn try_from(row: &Row) -> Result<Self> {
        Ok(Self {
            name: row.try_get("name")?,
            version: row.try_get("version")?,
            status: VersionStatus::parse(row.try_get("status")?)?,
            schema_name: row.try_get("schema_name")?,
            fingerprint: row.try_get("fingerprint")?,
            event_types: row.try_get("event_types")?,
            mode: parse_mode(row.try_get("mode")?)?,
            last_position: row.try_get("last_position")?,
            events_processed: row.try_get("events_processed")?,
            events_skipped: row.try_get("events_skipped")?,
            events_parked: row.try_get("events_parked")?,
            events_total: row.try_get("events_total")?,
            rate_per_s: row.try_get("rate_per_s")?,
            eta_s: row.try_get("eta_s")?,
            last_error: row.try_get("last_error")?,
            created_at: row.try_get("created_at")?,
            replay_started_at: row.try_get("replay_started_at")?,
            replay_finished_at: row.try_get("replay_finished_at")?,
            activated_at: row.try_get("activated_at")?,
            retired_at: row.try_get("retired_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

const SELECT: &str = "SELECT name, version, status, schema_name, fingerprint, event_types, mode, \
    last_position, events_processed, events_skipped, events_parked, events_total, rate_per_s, eta_s, \
    last_error, coord.iso(created_at) AS created_at, coord.iso(replay_started_at) AS replay_started_at, \
    coord.iso(replay_finished_at) AS replay_finished_at, coord.iso(activated_at) AS activated_at, \
    coord.iso(retired_at) AS retired_at, coord.iso(updated_at) AS updated_at \
    FROM coord.projector_versions";

/// Every version, by name then creation.
///
/// # Errors
/// Database errors.
pub async fn list(client: &impl GenericClient) -> Result<Vec<VersionRecord>> {
    let rows = client
        .query(&format!("{SELECT} ORDER BY name, created_at, version"), &[])
        .await?;
    rows.iter().map(VersionRecord::try_from).collect()
}

/// The versions of `name`, oldest first.
///
/// # Errors
/// Database errors.
pub async fn list_of(client: &impl GenericClient, name: &str) -> Result<Vec<VersionRecord>> {
    let rows = client
        .query(
            &format!("{SELECT} WHERE name = $1 ORDER BY created_at, version"),
            &[&name],
        )
        .await?;
    rows.iter().map(VersionRecord::try_from).collect()
}

/// The row of `name@version`, if any.
///
/// # Errors
/// Database errors.
pub async fn get(
    client: &impl GenericClient,
    name: &str,
    version: &str,
) -> Result<Option<VersionRecord>> {
    let row = client
        .query_typed_opt(
            &format!("{SELECT} WHERE name = $1 AND version = $2"),
            &[(&name, Type::TEXT), (&version, Type::TEXT)],
        )
        .await?;
    row.as_ref().map(VersionRecord::try_from).transpose()
}

/// The record of the active version of projector `name`, if any (read
/// after the caller locked the state row, in the same transaction).
///
/// # Errors
/// Database errors.
pub async fn get_active(client: &impl GenericClient, name: &str) -> Result<Option<VersionRecord>> {
    let row = client
        .query_typed_opt(
            &format!(
                "{SELECT} WHERE name = $1 AND version = \
                 (SELECT active_version FROM coord.projector_states WHERE name = $1)"
            ),
            &[(&name, Type::TEXT)],
        )
        .await?;
    row.as_ref().map(VersionRecord::try_from).transpose()
}

/// What is needed to register a version.
#[derive(Clone, Debug)]
pub struct NewVersion<'a> {
    /// Projector name.
    pub name: &'a str,
    /// Version.
    pub version: &'a str,
    /// Its schema.
    pub schema_name: &'a str,
    /// Definition fingerprint.
    pub fingerprint: &'a str,
    /// Handled event types.
    pub event_types: &'a [String],
    /// `inline` or `async`.
    pub mode: Mode,
    /// Initial status.
    pub status: VersionStatus,
    /// What `coord.publish` needs to run it inline (`{"handlers": {...}}`),
    /// for config-defined projectors.
    pub definition: Option<&'a serde_json::Value>,
}

const INSERT: &str = "INSERT INTO coord.projector_versions \
    (name, version, status, schema_name, fingerprint, event_types, mode, definition, replay_started_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $3 = 'replaying' THEN now() END)";

/// Registers a new version.
///
/// # Errors
/// Database errors (a duplicate, a schema name already taken).
pub async fn insert(client: &impl GenericClient, v: &NewVersion<'_>) -> Result<()> {
    client
        .execute(
            INSERT,
            &[
                &v.name,
                &v.version,
                &v.status.as_str(),
                &v.schema_name,
                &v.fingerprint,
                &v.event_types,
                &v.mode.as_str(),
                &v.definition,
            ],
        )
        .await?;
    Ok(())
}

/// The stored definition of a projector for `coord.publish`:
/// `{"handlers": {"EventType": "SQL", ...}}`, or `None` for a projector
/// without handler SQL (a Rust projector). An object, so that later
/// versions can add keys.
pub fn definition_of(
    handlers: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<serde_json::Value> {
    handlers.map(|h| serde_json::json!({ "handlers": h }))
}

const SET_DEFINITION: &str = "UPDATE coord.projector_versions SET definition = $3 \
    WHERE name = $1 AND version = $2 AND definition IS DISTINCT FROM $3";

/// Stores the definition of `name@version` (see [`definition_of`]), for a
/// version registered before coord stored it or restarted after an abort.
///
/// # Errors
/// Database errors.
pub async fn set_definition(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    definition: Option<&serde_json::Value>,
) -> Result<()> {
    client
        .execute(SET_DEFINITION, &[&name, &version, &definition])
        .await?;
    Ok(())
}

const SET_STATUS: &str = "UPDATE coord.projector_versions SET status = $3, updated_at = now(), \
    activated_at = CASE WHEN $3 = 'active' THEN now() ELSE activated_at END, \
    retired_at = CASE WHEN $3 = 'retired' THEN now() WHEN $3 = 'active' THEN NULL ELSE retired_at END, \
    replay_started_at = CASE WHEN $3 = 'replaying' AND replay_started_at IS NULL THEN now() ELSE replay_started_at END \
    WHERE name = $1 AND version = $2";

/// Sets the status of `name@version` (and the matching timestamp).
///
/// # Errors
/// Database errors; [`Error::Failed`] when the version is not registered.
pub async fn set_status(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    status: VersionStatus,
) -> Result<()> {
    let n = client
        .execute_typed(
            SET_STATUS,
            &[
                (&name, Type::TEXT),
                (&version, Type::TEXT),
                (&status.as_str(), Type::TEXT),
            ],
        )
        .await?;
    if n == 0 {
        return Err(Error::Failed(format!(
            "projector version {name}@{version} is not registered"
        )));
    }
    Ok(())
}

/// Deletes the row of `name@version` (its checkpoint and parked events go with it).
///
/// # Errors
/// Database errors.
pub async fn delete(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    // No foreign key since V4 (publishers insert here): delete by hand.
    client
        .execute(
            "DELETE FROM coord.applied_ahead WHERE name = $1 AND version = $2",
            &[&name, &version],
        )
        .await?;
    client
        .execute(
            "DELETE FROM coord.projector_versions WHERE name = $1 AND version = $2",
            &[&name, &version],
        )
        .await?;
    Ok(())
}
