//! Publishing through the gate: check, append with optimistic concurrency,
//! and run the configuration's active inline projectors, all in the caller's
//! transaction. Appends go to the bundled store `coord.events`, through
//! the event-store module (`crate::event_store`), which owns the statement.

use std::time::{Duration, Instant};

use futures_util::future::join;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

use crate::config::Mode;
use crate::event_store::{self, Append};
use crate::projector::{
    handler_failure, restore_search_path, set_search_path, ApplyContext, Event, Phase,
    ProjectorExt, ProjectorSet,
};
use crate::{Error, Result};

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Its type.
    pub event_type: String,
    /// Its payload.
    pub data: serde_json::Value,
    /// Its metadata (`{}` when `None`).
    pub metadata: Option<serde_json::Value>,
}

impl NewEvent {
    /// An event without metadata.
    pub fn new(event_type: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            event_type: event_type.into(),
            data,
            metadata: None,
        }
    }
}

/// What the stream's version must be before the append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Whatever it is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version.
    Exact(i64),
}

impl ExpectedVersion {
    fn as_param(self) -> Option<i64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }
}

/// Backoff for [`Publisher::publish_with_retry`].
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Stop retrying after this long.
    pub deadline: Duration,
    /// First pause; doubles up to `max_pause`.
    pub first_pause: Duration,
    /// Longest pause.
    pub max_pause: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(5),
            // Activations hold events back for milliseconds: short pauses
            // keep a retry from overshooting the end by much.
            first_pause: Duration::from_millis(1),
            max_pause: Duration::from_millis(10),
        }
    }
}

/// Publishes events through the gate for one configuration of projectors.
#[derive(Clone, Debug)]
pub struct Publisher {
    projectors: ProjectorSet,
    versions: serde_json::Value,
    /// `name/type` for every projector and event type it handles.
    handled: Vec<String>,
    gate: bool,
}

impl Publisher {
    /// A publisher running `projectors` (its configuration `C`).
    pub fn new(projectors: ProjectorSet) -> Self {
        let versions = gate_json(&projectors);
        let handled = projectors
            .iter()
            .flat_map(|p| {
                let name = p.name().to_string();
                p.event_types()
                    .into_iter()
                    .map(move |t| format!("{name}/{t}"))
            })
            .collect();
        Self {
            projectors,
            versions,
            handled,
            gate: true,
        }
    }

    /// Turns the gate off (`false`) or on. Without the gate, every inline
    /// projector of the set runs and nothing protects against stale code: this
    /// exists to measure what the gate costs, never for production.
    pub fn with_gate(mut self, enabled: bool) -> Self {
        self.gate = enabled;
        self
    }

    /// The configuration.
    pub fn projectors(&self) -> &ProjectorSet {
        &self.projectors
    }

    /// Checks the gate without publishing (in `tx`, which should then end).
    /// `event_types` `None` means "any type".
    ///
    /// # Errors
    /// The gate refusals; database errors.
    pub async fn check(
        &self,
        tx: &Transaction<'_>,
        event_types: Option<&[String]>,
    ) -> Result<Vec<String>> {
        crate::gate::check(tx, &self.versions, event_types).await
    }

    /// Appends `events` to `stream_id` in `tx`: checks the gate (versions
    /// and definitions), appends (refusing if the stream is not at
    /// `expected`), records in `coord.applied_ahead` which active inline
    /// projectors apply them, then runs those projectors on them. A
    /// projector whose version has not applied the stream's earlier events
    /// yet (they reached the store another way) is left to the follower,
    /// to keep stream order. Returns the events as stored. On error the
    /// caller must roll `tx` back.
    ///
    /// # Errors
    /// The gate refusals, [`Error::StreamVersionConflict`], a handler's
    /// failure as [`Error::Handler`], database errors.
    pub async fn publish(
        &self,
        tx: &Transaction<'_>,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Vec<Event>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        for event in events {
            crate::names::check_event_type(&event.event_type).map_err(Error::InvalidInput)?;
        }
        let mut types: Vec<String> = events.iter().map(|e| e.event_type.clone()).collect();
        types.sort();
        types.dedup();
        let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let data: Vec<&serde_json::Value> = events.iter().map(|e| &e.data).collect();
        let empty = serde_json::json!({});
        let metadata: Vec<&serde_json::Value> = events
            .iter()
            .map(|e| e.metadata.as_ref().unwrap_or(&empty))
            .collect();
        let expected_param = expected.as_param();
        let appended = event_store::append(
            tx,
            &Append {
                stream_id,
                event_types: &event_types,
                data: &data,
                metadata: &metadata,
                expected: expected_param,
                gate: self.gate,
                versions: &self.versions,
                types: &types,
                handled: &self.handled,
            },
        )
        .await?;
        if appended.rows.len() != events.len() {
            return Err(Error::StreamVersionConflict {
                stream: stream_id.to_owned(),
                expected: expected_param.unwrap_or_default(),
                actual: event_store::stream_version(tx, stream_id).await?,
            });
        }
        let inline: Vec<String> = if self.gate {
            appended.inline.unwrap_or_default()
        } else {
            self.projectors
                .iter()
                .filter(|p| p.mode() == Mode::Inline)
                .map(|p| p.name().to_string())
                .collect()
        };
        let search_path = appended.search_path.unwrap_or_default();
        let stored: Vec<Event> = events
            .iter()
            .zip(appended.rows)
            .map(|(event, row)| Event {
                position: row.position,
                stream_id: stream_id.to_owned(),
                stream_version: row.stream_version,
                event_type: event.event_type.clone(),
                data: event.data.clone(),
                metadata: event.metadata.clone().unwrap_or_else(|| empty.clone()),
                recorded_at: row.recorded_at,
            })
            .collect();
        self.run_inline(tx, &inline, &stored, &search_path).await?;
        Ok(stored)
    }

    async fn run_inline(
        &self,
        tx: &Transaction<'_>,
        inline: &[String],
        events: &[Event],
        search_path: &str,
    ) -> Result<()> {
        let mut changed = false;
        for name in inline {
            // The statement returned only inline versions this
            // configuration runs, and recorded them as applied.
            let Some(projector) = self.projectors.get(name) else {
                continue;
            };
            let handled: Vec<Event> = events
                .iter()
                .filter(|e| projector.handles(&e.event_type))
                .cloned()
                .collect();
            if handled.is_empty() {
                continue;
            }
            changed = true;
            let ctx = ApplyContext {
                schema: projector.schema(),
                phase: Phase::Inline,
            };
            // Pipelined: the server runs the handlers after `search_path` is set.
            let set = set_search_path(tx, &ctx.schema);
            let (set, applied) = join(set, projector.apply(tx, &handled, &ctx)).await;
            set?;
            applied.map_err(|e| handler_failure(projector.as_ref(), &handled[0], &e))?;
        }
        if changed {
            restore_search_path(tx, search_path).await?;
        }
        Ok(())
    }

    /// Publishes in a transaction of its own on `client`, retrying
    /// [`Error::ProjectorIsActivating`] (an activation in progress) with
    /// backoff until `policy.deadline`; commits on success.
    ///
    /// # Errors
    /// As [`Publisher::publish`]; [`Error::ProjectorIsActivating`] when the
    /// deadline passes.
    pub async fn publish_with_retry(
        &self,
        client: &mut Client,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
        policy: RetryPolicy,
    ) -> Result<Vec<Event>> {
        let started = Instant::now();
        let mut pause = policy.first_pause;
        loop {
            let tx = client.transaction().await?;
            match self.publish(&tx, stream_id, expected, events).await {
                Ok(stored) => {
                    tx.commit().await?;
                    return Ok(stored);
                }
                Err(e @ Error::ProjectorIsActivating { .. }) => {
                    tx.rollback().await?;
                    if started.elapsed() + pause > policy.deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, pause_ms = pause.as_millis() as u64, "retrying publish");
                    let wait = WAIT_OUT_MAX.min(policy.deadline.saturating_sub(started.elapsed()));
                    let projector = e.activating_projector().unwrap_or_default();
                    if !wait_out_activation(client, projector, wait).await? {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(policy.max_pause);
                    }
                }
                Err(e) => {
                    tx.rollback().await?;
                    return Err(e);
                }
            }
        }
    }
}

/// The longest one wait for an activation to end lasts before the publisher
/// retries anyway (docs/decisions/0067-publishers-wait-out-the-whole-activation.md).
const WAIT_OUT_MAX: Duration = Duration::from_millis(100);

/// Waits, in a short transaction of its own that holds nothing else, for
/// the activation of `projector` to end: an activation holds the session
/// lock `(ACTIVATING, hashtext(projector))` exclusive from before it marks
/// its version activating until the version is active or back to
/// replaying, so a publisher refused with `ProjectorIsActivating` sleeps
/// here through the whole activation and retries the moment it ends,
/// instead of polling the gate
/// (docs/decisions/0067-publishers-wait-out-the-whole-activation.md).
/// Returns `false` at once when no activation holds the lock (one was
/// interrupted and left its version activating: the caller pauses and
/// retries); `true` after waiting (or when `wait` passed first).
/// Call it after a [`Error::ProjectorIsActivating`] refusal, with the
/// refusal's `projector`, once the publishing transaction has rolled back:
/// what [`Publisher::publish_with_retry`] does between attempts, for
/// callers with their own retry loop.
///
/// # Errors
/// Database errors other than the lock timeout.
pub async fn wait_out_activation(
    client: &mut Client,
    projector: &str,
    wait: Duration,
) -> Result<bool> {
    let tx = client.transaction().await?;
    let free: bool = tx
        .query_typed(TRY_MARKER, &[(&projector, Type::TEXT)])
        .await?
        .first()
        .map_or(Ok(true), |row| row.try_get(0))?;
    if free {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        wait.as_millis().max(1)
    ))
    .await?;
    match tx
        .query_typed(WAIT_MARKER, &[(&projector, Type::TEXT)])
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
        Err(e) => return Err(e.into()),
    }
    tx.rollback().await?;
    Ok(true)
}

/// The activation marker of a projector, shared: whether it was free.
const TRY_MARKER: &str = concat!(
    "SELECT pg_try_advisory_xact_lock_shared(",
    crate::locks::key!(activating),
    ", hashtext($1))"
);
/// The same, waiting for it.
const WAIT_MARKER: &str = concat!(
    "SELECT pg_advisory_xact_lock_shared(",
    crate::locks::key!(activating),
    ", hashtext($1))"
);

/// The `projectors` argument of the gate for `set`: each name mapped to its
/// version and fingerprint (`{"balances": {"version": "1.0.0", "fingerprint":
/// "..."}}`), so the gate also refuses a changed definition.
pub(crate) fn gate_json(set: &ProjectorSet) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = set
        .iter()
        .map(|p| {
            (
                p.name().to_string(),
                serde_json::json!({
                    "version": p.version().to_string(),
                    "fingerprint": p.fingerprint(),
                }),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}
