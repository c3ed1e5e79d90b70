//! `coord rebuild P`: reset and replay the active version in place without
//! stopping publishers: the version is rebuilt into a shadow schema (as
//! `{version}+coord-rebuild`), caught up, verified, and swapped in by
//! renaming schemas inside the critical section; the old tables are dropped
//! afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use semver::{BuildMetadata, Version};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use super::critical::{critical_section, Change};
use super::run::{verify, ActivateOptions, StepReport};
use super::steps::lock_and_check;
use super::switch::SwitchReport;
use crate::config::{DatabaseUrl, Mode, OnError};
use crate::names::{ProjectorName, RelationName};
use crate::projector::{ApplyContext, Event, HandlerError, Projector, ProjectorExt};
use crate::replay;
use crate::schema_drop::{drop_schemas, ensure_droppable, Dependents};
use crate::store::versions;
use crate::store::{states, Actor};
use crate::{Error, Result};

/// The projector under its shadow version: same definition, own schema.
struct Shadow {
    inner: Arc<dyn Projector>,
    version: Version,
}

impl Shadow {
    fn of(inner: Arc<dyn Projector>) -> Self {
        let mut version = inner.version().clone();
        let build = if version.build.is_empty() {
            "coord-rebuild".to_owned()
        } else {
            format!("{}.coord-rebuild", version.build)
        };
        version.build = BuildMetadata::new(&build).expect("valid build metadata");
        Self { inner, version }
    }
}

#[async_trait]
impl Projector for Shadow {
    fn name(&self) -> &ProjectorName {
        self.inner.name()
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        self.inner.event_types()
    }
    fn tables(&self) -> &str {
        self.inner.tables()
    }
    fn mode(&self) -> Mode {
        self.inner.mode()
    }
    fn on_error(&self) -> OnError {
        self.inner.on_error()
    }
    fn verify(&self) -> Vec<String> {
        self.inner.verify()
    }
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
    fn replay_reads_payload(&self) -> bool {
        self.inner.replay_reads_payload()
    }
    fn replay_reads_metadata(&self) -> bool {
        self.inner.replay_reads_metadata()
    }
    fn replay_reads_data_keys(&self) -> Option<Vec<String>> {
        self.inner.replay_reads_data_keys()
    }
    fn handler_sql(&self) -> Option<std::collections::BTreeMap<String, String>> {
        self.inner.handler_sql()
    }
    fn stored_definition(&self) -> Option<serde_json::Value> {
        self.inner.stored_definition()
    }
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        self.inner.apply(tx, events, ctx).await
    }
}

/// Rebuilds the active version of `projector` from the event store while
/// publishers keep publishing, then swaps the rebuilt tables in.
///
/// # Errors
/// [`Error::Refused`] when `projector`'s version is not the active one or its
/// definition differs from the active one's; [`Error::Busy`] for the activation lock, [`Error::LockDeadline`] for
/// the critical section's deadline; handler, verify and
/// database errors.
#[tracing::instrument(skip_all, fields(projector.name = %projector.name()), err(level = "debug"))]
pub async fn rebuild(
    pool: &Pool,
    url: &DatabaseUrl,
    projector: &Arc<dyn Projector>,
    event_store: &RelationName,
    options: &ActivateOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Result<StepReport> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let (lock, client) = lock_and_check(pool, url, event_store, options, actor).await?;
    {
        let active = states::get(&**client, name, false)
            .await?
            .and_then(|s| s.active_version);
        if active.as_deref() != Some(version.as_str()) {
            return Err(Error::Refused(format!(
                "{} is not the active version of {name} (active: {}): rebuild rebuilds the active version",
                projector.label(),
                active.as_deref().unwrap_or("none")
            )));
        }
        let record = versions::get(&**client, name, &version).await?;
        if record.is_some_and(|r| r.fingerprint != projector.fingerprint()) {
            return Err(Error::Refused(format!(
                "{} was built from a different definition than this configuration's: a changed projector needs a new version",
                projector.label()
            )));
        }
        // Views over the live tables follow them to the old schema and would
        // go with it: refuse before anything is built.
        ensure_droppable(
            &**client,
            &[projector.schema().as_str()],
            options.dependents,
            &format!("rebuilding {}", projector.label()),
        )
        .await?;
    }
    drop(client); // back to the pool for the replay
    let live = projector.schema();
    let retired = format!("{}_old", &live[..live.len().min(59)]);
    drop_leftover(
        pool,
        &lock,
        &retired,
        projector.as_ref(),
        options.dependents,
    )
    .await?;
    let shadow = Shadow::of(projector.clone());
    let started = Instant::now();
    let mut applied = 0;
    {
        let mut pooled = pool.get().await?;
        let client: &mut tokio_postgres::Client = &mut pooled;
        replay::start_replay(client, &shadow, actor).await?;
    }
    let mut options_replay = options.replay.clone();
    applied += replay::catch_up(pool, &shadow, event_store, &options_replay, cancel)
        .await?
        .applied;
    if cancel.is_cancelled() {
        return Err(Error::Cancelled {
            during: format!("the rebuild of {}", projector.label()),
        });
    }
    verify(pool, &shadow).await?;
    options_replay.lag_threshold = 1;
    options_replay.progress = None;
    applied += replay::catch_up(pool, &shadow, event_store, &options_replay, cancel)
        .await?
        .applied;
    let replay_seconds = started.elapsed().as_secs_f64();

    let critical = Instant::now();
    let change = Change::Rebuild {
        projector: projector.as_ref(),
        shadow: &shadow,
        retired_schema: &retired,
        rename_timeout: options.locks.deadline,
    };
    let (final_events, _) = critical_section(
        pool,
        &change,
        event_store,
        options.locks,
        actor,
        Some(&lock),
    )
    .await?;
    let critical_ms = critical.elapsed().as_secs_f64() * 1e3;

    // Outside the critical section: readers of the old tables may hold locks.
    let mut pooled = pool.get().await?;
    drop_old_tables(&mut pooled, &retired, options.dependents).await;
    lock.release().await?;
    Ok(StepReport {
        projector: name.to_owned(),
        version: Some(version.clone()),
        action: "rebuild".into(),
        replayed_events: applied + final_events,
        replay_seconds,
        switch: Some(SwitchReport {
            projector: name.to_owned(),
            from: Some(version.clone()),
            to: Some(version),
            final_events,
            held_back_ms: critical_ms,
            critical_ms,
        }),
    })
}

/// Drops `retired` when an earlier rebuild left it (killed between its swap
/// and the drop, or the drop failed), so the swap can rename the live schema
/// to it; through [`drop_schemas`], which refuses (changing nothing) when
/// objects outside it depend on it, unless `dependents` cascades.
///
/// # Errors
/// [`Error::Refused`] naming the dependents; a lost activation lock;
/// database errors.
async fn drop_leftover(
    pool: &Pool,
    lock: &super::lock::ActivationLock,
    retired: &str,
    projector: &dyn Projector,
    dependents: Dependents,
) -> Result<()> {
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.transaction().await?;
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&retired],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(());
    }
    lock.fence(&tx, "dropping the old tables an earlier rebuild left")
        .await?;
    tracing::warn!(schema = %retired, "dropping the old tables an earlier rebuild of {} left", projector.label());
    drop_schemas(
        &tx,
        &[retired],
        dependents,
        &format!(
            "rebuilding {} (the old tables an earlier rebuild left)",
            projector.label()
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Drops the schema that held the tables before the swap, retrying while
/// readers hold locks on them. A failure (a dependent created since the
/// check, locks held too long) leaves the schema and logs a warning: the
/// rebuild itself has succeeded.
async fn drop_old_tables(
    client: &mut tokio_postgres::Client,
    retired: &str,
    dependents: Dependents,
) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = async {
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL lock_timeout = '200ms'").await?;
            drop_schemas(&tx, &[retired], dependents, "rebuild").await?;
            tx.commit().await?;
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(Error::Db(e)) if attempts < 50 && e.code().map(|c| c.code()) == Some("55P03") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!(schema = %retired, error = %e, "could not drop the old tables; the next rebuild drops them (or drop the schema by hand)");
                return;
            }
        }
    }
}
