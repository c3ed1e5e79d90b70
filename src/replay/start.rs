//! Registering a projector version for replay ([`start_replay`]): its row in
//! `coord.projector_versions`, its schema and tables, `replaying_version`,
//! and the transition, in one transaction; and dropping a replay
//! ([`abort`]). Never applies events and never touches the active version.

use semver::Version;
use tokio_postgres::{Client, Transaction};
use tracing::{info, instrument};

use crate::names::{quote_ident, ProjectorName};
use crate::projector::{Projector, ProjectorExt};
use crate::replay::batch::set_search_path;
use crate::schema_drop::{drop_schemas, Dependents};
use crate::store::versions::{self, NewVersion, VersionStatus};
use crate::store::{checkpoint, history, states, Actor};
use crate::{Error, Result};

/// What [`start_replay`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOutcome {
    /// Registered the version and created its schema and tables.
    Started,
    /// The version was already replaying with the same definition: resume it.
    Resumed,
    /// The version had been aborted: its schema was rebuilt and its
    /// checkpoint reset.
    Restarted,
    /// The version is already active: nothing to replay.
    AlreadyActive,
}

/// The result of [`start_replay`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplayStart {
    /// Projector name.
    pub projector: String,
    /// Version.
    pub version: String,
    /// Its schema.
    pub schema: String,
    /// What happened.
    pub outcome: StartOutcome,
}

/// Registers `projector`'s version for replay in one transaction (see
/// [`start_replay_in`]) and commits.
///
/// # Errors
/// As [`start_replay_in`].
#[instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub async fn start_replay(
    client: &mut Client,
    projector: &dyn Projector,
    actor: &Actor,
) -> Result<ReplayStart> {
    let tx = client.transaction().await?;
    let start = start_replay_in(&tx, projector, actor).await?;
    tx.commit().await?;
    Ok(start)
}

/// Registers `projector`'s version for replay inside the caller's
/// transaction: its row in `coord.projector_versions` (status `replaying`,
/// schema, fingerprint, event types, mode), its schema with the projector's
/// tables, `replaying_version` in `coord.projector_states` (the active
/// version is kept), and a transition. A version already replaying with the
/// same definition is resumed; an aborted one is rebuilt from scratch; an
/// active one needs nothing.
///
/// # Errors
/// [`Error::Refused`] when the version exists with another definition,
/// another version of the projector is replaying or activating, the version
/// is older than the active one, or it is retired; [`Error::InvalidInput`]
/// when the projector's table DDL fails; database errors.
pub async fn start_replay_in(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    actor: &Actor,
) -> Result<ReplayStart> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let label = projector.label();
    let schema = projector.schema();
    let fingerprint = projector.fingerprint();
    let mut event_types = projector.event_types();
    event_types.sort();
    let mode = projector.mode();
    let definition = projector.stored_definition();
    let done = |outcome| ReplayStart {
        projector: name.to_owned(),
        version: version.clone(),
        schema: schema.clone(),
        outcome,
    };

    crate::sql_check::check_definition(projector)?;
    let state = states::get(tx, name, true).await?;
    let active = state.as_ref().and_then(|s| s.active_version.clone());
    if active.as_deref() == Some(version.as_str()) {
        let record = versions::get(tx, name, &version).await?;
        if record.is_some_and(|r| r.fingerprint != fingerprint) {
            return Err(Error::Refused(format!(
                "projector {label} was built with a different definition; bump the version"
            )));
        }
        // Same fingerprint, so the same handlers: store them for
        // coord.publish if the version was registered before coord did.
        versions::set_definition(tx, name, &version, definition.as_ref()).await?;
        return Ok(done(StartOutcome::AlreadyActive));
    }
    if let Some(activating) = state.as_ref().and_then(|s| s.activating_version.as_deref()) {
        return Err(Error::Refused(format!(
            "projector {name} is activating {activating}: wait for the activation to finish, then retry"
        )));
    }
    let replaying = state.as_ref().and_then(|s| s.replaying_version.clone());
    if let Some(other) = replaying.as_deref().filter(|r| *r != version) {
        return Err(Error::Refused(format!(
            "projector {name} is already replaying {other}: run `coord abort --projector {name}` \
             before replaying {version}"
        )));
    }
    // A version already replaying is resumed whatever its number: an
    // older one is a retired version an interrupted rollback put back.
    if let Some(active) = active.as_deref().filter(|_| replaying.is_none()) {
        if Version::parse(active).is_ok_and(|a| a > *projector.version()) {
            return Err(Error::Refused(format!(
                "projector {name} {version} is older than the active {active}: a downgrade is \
                 refused; use `coord rollback {name}` to re-activate a previous version"
            )));
        }
    }

    let existing = versions::get(tx, name, &version).await?;
    let (outcome, from) = match &existing {
        None => {
            ensure_schema_free(tx, &schema, &label).await?;
            versions::insert(
                tx,
                &NewVersion {
                    name,
                    version: &version,
                    schema_name: &schema,
                    fingerprint: &fingerprint,
                    event_types: &event_types,
                    mode,
                    status: VersionStatus::Replaying,
                    definition: definition.as_ref(),
                },
            )
            .await?;
            create_tables(tx, projector, &schema).await?;
            (StartOutcome::Started, None)
        }
        Some(record) if record.status == VersionStatus::Aborted => {
            checkpoint::reset(
                tx,
                name,
                &version,
                &fingerprint,
                &event_types,
                mode.as_str(),
            )
            .await?;
            versions::set_definition(tx, name, &version, definition.as_ref()).await?;
            drop_schemas(
                tx,
                &[record.schema_name.as_str()],
                Dependents::Refuse,
                &format!("restarting the aborted replay of {label}"),
            )
            .await?;
            create_tables(tx, projector, &schema).await?;
            (StartOutcome::Restarted, Some(VersionStatus::Aborted))
        }
        Some(record) if record.fingerprint != fingerprint => {
            return Err(Error::Refused(format!(
                "projector {label} was built with a different definition; bump the version"
            )));
        }
        Some(record) if record.status == VersionStatus::Replaying => {
            versions::set_definition(tx, name, &version, definition.as_ref()).await?;
            if replaying.as_deref() == Some(version.as_str()) {
                return Ok(done(StartOutcome::Resumed));
            }
            (StartOutcome::Resumed, Some(VersionStatus::Replaying))
        }
        Some(record) => {
            return Err(Error::Refused(format!(
                "projector {label} is {}: it cannot be replayed again; use `coord rollback {name}` \
                 to re-activate a retired version, or bump the version",
                record.status
            )));
        }
    };
    crate::privileges::grant(tx, &schema, &actor.privileges).await?;
    states::start_replaying(tx, name, &version).await?;
    history::record(
        tx,
        actor,
        name,
        Some(&version),
        from,
        VersionStatus::Replaying,
        Some(&format!("schema {schema}")),
    )
    .await?;
    info!(schema = %schema, outcome = ?outcome, "replay registered");
    Ok(done(outcome))
}

async fn ensure_schema_free(tx: &Transaction<'_>, schema: &str, label: &str) -> Result<()> {
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await?;
    if row.try_get(0)? {
        return Err(Error::Refused(format!(
            "schema {schema} already exists but coord has no record of {label}: \
             drop or rename it, then retry"
        )));
    }
    Ok(())
}

async fn create_tables(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    schema: &str,
) -> Result<()> {
    let previous: String = tx
        .query_one("SELECT current_setting('search_path')", &[])
        .await?
        .try_get(0)?;
    tx.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(schema)))
        .await?;
    set_search_path(tx, schema).await?;
    tx.batch_execute(projector.tables()).await.map_err(|e| {
        let message = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned());
        Error::InvalidInput(format!(
            "the tables of projector {} cannot be created: {message}; fix its `tables` DDL",
            projector.label()
        ))
    })?;
    crate::projector::restore_search_path(tx, &previous).await?;
    Ok(())
}

/// What [`abort`] dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AbortReport {
    /// Projector name.
    pub projector: String,
    /// The version whose replay was dropped.
    pub version: String,
    /// The schema dropped.
    pub schema: String,
}

/// Drops the replay in progress of projector `name` (see [`abort_in`]) and
/// commits; refuses when objects outside its schema depend on it.
///
/// # Errors
/// As [`abort_in`].
pub async fn abort(client: &mut Client, name: &str, actor: &Actor) -> Result<AbortReport> {
    abort_with(client, name, actor, Dependents::Refuse).await
}

/// [`abort`], with the choice of what happens to objects outside the
/// schema that depend on it (`coord abort --cascade`).
///
/// # Errors
/// As [`abort_in`].
#[instrument(skip_all, fields(projector.name = %name), err(level = "debug"))]
pub async fn abort_with(
    client: &mut Client,
    name: &str,
    actor: &Actor,
    dependents: Dependents,
) -> Result<AbortReport> {
    let tx = client.transaction().await?;
    let report = abort_in(&tx, name, actor, dependents).await?;
    tx.commit().await?;
    Ok(report)
}

/// Drops the replay in progress of projector `name` inside the caller's
/// transaction: its schema (with everything in it), status `aborted`,
/// `replaying_version` cleared, a transition. The active version is
/// untouched. A pass running elsewhere stops at its next batch. Objects
/// outside the schema that depend on it make it refuse, listing them, unless
/// `dependents` is [`Dependents::Cascade`].
///
/// # Errors
/// [`Error::InvalidInput`] for an invalid name; [`Error::Refused`] when no
/// version of `name` is replaying, when the `coord` schema is newer than
/// this binary, or when objects outside the schema depend on it; database
/// errors.
pub async fn abort_in(
    tx: &Transaction<'_>,
    name: &str,
    actor: &Actor,
    dependents: Dependents,
) -> Result<AbortReport> {
    let name = ProjectorName::new(name).map_err(Error::InvalidInput)?;
    let name = name.as_str();
    crate::migrate::ensure_writable(tx).await?;
    let state = states::get(tx, name, true).await?;
    let Some(state) = state.filter(|s| s.replaying_version.is_some()) else {
        return Err(Error::Refused(format!(
            "nothing to abort: no version of projector {name} is replaying"
        )));
    };
    let version = state.replaying_version.clone().unwrap_or_default();
    let record = versions::get(tx, name, &version).await?.ok_or_else(|| {
        Error::Failed(format!(
            "projector {name} is replaying {version} but coord.projector_versions has no row for it"
        ))
    })?;
    // Lock the version row first: a batch in flight finishes, the next one
    // sees the abort.
    checkpoint::mark_aborted(tx, name, &version).await?;
    drop_schemas(
        tx,
        &[record.schema_name.as_str()],
        dependents,
        &format!("aborting the replay of {name}@{version}"),
    )
    .await?;
    states::stop_replaying(tx, name).await?;
    history::record(
        tx,
        actor,
        name,
        Some(&version),
        Some(record.status),
        VersionStatus::Aborted,
        Some(&format!("dropped schema {}", record.schema_name)),
    )
    .await?;
    info!(version = %version, schema = %record.schema_name, "replay aborted");
    Ok(AbortReport {
        projector: name.to_owned(),
        version,
        schema: record.schema_name,
    })
}
