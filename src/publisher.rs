//! Publishing through the gate: check, append with optimistic concurrency,
//! and run the configuration's active inline projectors, all in the caller's
//! transaction. Appends go to the bundled store `coord.events`, through
//! the event-store module (`crate::event_store`), which owns the statement.

use std::time::{Duration, Instant};

use futures_util::future::join;
use tokio_postgres::types::{ToSql, Type};
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
        self.publish_in(tx, stream_id, expected, events, true).await
    }

    /// Like [`Publisher::publish`], then commits `tx`: one round trip
    /// fewer, as the handlers' `search_path` is left for the commit to
    /// undo (it is set local to the transaction) instead of being restored.
    /// On error `tx` is rolled back.
    ///
    /// # Errors
    /// As [`Publisher::publish`]; the commit's errors.
    pub async fn publish_and_commit(
        &self,
        tx: Transaction<'_>,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Vec<Event>> {
        match self
            .publish_in(&tx, stream_id, expected, events, false)
            .await
        {
            Ok(stored) => {
                tx.commit().await?;
                Ok(stored)
            }
            Err(e) => {
                // The refusal or failure says more than a failed rollback
                // would (the connection is then broken, which the next
                // statement tells).
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// [`Publisher::publish`]; with `restore` false, the caller's
    /// `search_path` is not restored after the handlers (the caller ends
    /// the transaction next).
    async fn publish_in(
        &self,
        tx: &Transaction<'_>,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
        restore: bool,
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
        let restore = restore.then_some(search_path.as_str());
        self.run_inline(tx, &inline, &stored, restore).await?;
        Ok(stored)
    }

    async fn run_inline(
        &self,
        tx: &Transaction<'_>,
        inline: &[String],
        events: &[Event],
        restore: Option<&str>,
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
                named_failures_removed: false,
            };
            // Pipelined: the server runs the handlers after `search_path` is set.
            let set = set_search_path(tx, &ctx.schema);
            let (set, applied) = join(set, projector.apply(tx, &handled, &ctx)).await;
            set?;
            applied.map_err(|e| handler_failure(projector.as_ref(), &handled[0], &e))?;
        }
        if let (true, Some(search_path)) = (changed, restore) {
            restore_search_path(tx, search_path).await?;
        }
        Ok(())
    }

    /// [`wait_out_activation`] for this configuration: when it waited for an
    /// activation, a read of the projector's state pipelined after the wait
    /// (a statement of its own, so it sees what the activation committed)
    /// tells a publisher whose version the activation made stale at once:
    /// [`Error::NewerProjectorIsActive`], one round trip after the
    /// activation ended, instead of after another publishing attempt
    /// (docs/decisions/0085-refused-publishers-learn-the-outcome-as-they-wake.md).
    /// `Ok(true)`: retry the publish now (the gate decides); `Ok(false)`: no
    /// activation is running, yet the version may still be activating (one
    /// was interrupted): pause, then retry. Call it with `client` outside
    /// any transaction block. (The gate refuses a configuration with a stale
    /// version of any active projector whatever it publishes, so the event
    /// types do not matter here.)
    ///
    /// # Errors
    /// [`Error::NewerProjectorIsActive`]; database errors other than the
    /// lock timeout.
    pub async fn wait_out_activation(
        &self,
        client: &mut Client,
        projector: &str,
        wait: Duration,
    ) -> Result<bool> {
        let timeout = format!("{}ms", wait.as_millis().max(1));
        // Two statements in one round trip; each is its own implicit
        // transaction, so the state is read after the wait, with a snapshot
        // taken then, and without raising: a herd of refused publishers
        // waking at once costs the server no error handling.
        let wait_params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&timeout, Type::TEXT), (&projector, Type::TEXT)];
        let state_params: [(&(dyn ToSql + Sync), Type); 1] = [(&projector, Type::TEXT)];
        let (waited, state) = futures_util::join!(
            client.query_typed(WAIT_OUT_MARKER, &wait_params),
            client.query_typed(STATE_AFTER_WAIT, &state_params),
        );
        let waited = marker_wait(waited)?;
        if waited == MarkerWait::TimedOut {
            return Ok(true);
        }
        let state = state?;
        if waited == MarkerWait::Free {
            return Ok(false);
        }
        let Some(row) = state.first() else {
            return Ok(true);
        };
        let (active, activating): (Option<String>, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?);
        if activating.is_some() {
            // The marker went with a version still activating: interrupted.
            return Ok(false);
        }
        let running = self.projectors.get(projector).map(|p| p.version().clone());
        if let (Some(active), Some(running)) = (active, running) {
            if semver::Version::parse(&active).is_ok_and(|a| a > running) {
                return Err(Error::NewerProjectorIsActive {
                    projector: projector.to_owned(),
                    running: running.to_string(),
                    active,
                });
            }
        }
        Ok(true)
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
            match self
                .publish_and_commit(tx, stream_id, expected, events)
                .await
            {
                Ok(stored) => return Ok(stored),
                Err(e @ Error::ProjectorIsActivating { .. }) => {
                    if started.elapsed() + pause > policy.deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, pause_ms = pause.as_millis() as u64, "retrying publish");
                    let wait = WAIT_OUT_MAX.min(policy.deadline.saturating_sub(started.elapsed()));
                    let projector = e.activating_projector().unwrap_or_default();
                    if !self.wait_out_activation(client, projector, wait).await? {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(policy.max_pause);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The longest one wait for an activation to end lasts before the publisher
/// retries anyway (docs/decisions/0067-publishers-wait-out-the-whole-activation.md).
const WAIT_OUT_MAX: Duration = Duration::from_millis(100);

/// Waits, in one statement of its own (one round trip; its implicit
/// transaction holds nothing else), for the activation of `projector` to
/// end: an activation holds the session
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
/// refusal's `projector`, once the publishing transaction has rolled back
/// (`client` must not be inside a transaction block, or the shared marker
/// would be held until that transaction ends): what
/// [`Publisher::publish_with_retry`] does between attempts (through
/// [`Publisher::wait_out_activation`]), for callers with their own retry
/// loop.
///
/// # Errors
/// Database errors other than the lock timeout.
pub async fn wait_out_activation(
    client: &mut Client,
    projector: &str,
    wait: Duration,
) -> Result<bool> {
    // One statement outside any transaction block (its own implicit one,
    // which releases the shared marker and the local `lock_timeout` when it
    // ends): one round trip, so sixteen refused publishers cost the
    // activation little CPU as it starts and little as it ends.
    let timeout = format!("{}ms", wait.as_millis().max(1));
    let waited = client
        .query_typed(
            WAIT_OUT_MARKER,
            &[(&timeout, Type::TEXT), (&projector, Type::TEXT)],
        )
        .await;
    Ok(marker_wait(waited)? != MarkerWait::Free)
}

/// What a [`WAIT_OUT_MARKER`] statement found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MarkerWait {
    /// Free at once: no activation is running.
    Free,
    /// Granted after waiting: the activation ended.
    Granted,
    /// The wait ran out (`lock_timeout`) with the activation still running.
    TimedOut,
}

/// Reads the answer to a [`WAIT_OUT_MARKER`] statement.
fn marker_wait(
    answer: std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<MarkerWait> {
    match answer {
        Ok(rows) => {
            let waited = rows
                .first()
                .map_or(Ok(false), |row| row.try_get::<_, bool>(0))?;
            Ok(if waited {
                MarkerWait::Granted
            } else {
                MarkerWait::Free
            })
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Ok(MarkerWait::TimedOut)
        }
        Err(e) => Err(e.into()),
    }
}

/// The activation marker of projector `$2`, shared: `false` at once when it
/// is free (no activation runs), else `true` once it is granted, waiting at
/// most `$1` (`lock_timeout`, set first: `CASE` evaluates in order).
const WAIT_OUT_MARKER: &str = concat!(
    "SELECT CASE WHEN set_config('lock_timeout', $1, true) IS NULL THEN NULL ",
    "WHEN pg_try_advisory_xact_lock_shared(",
    crate::locks::key!(activating),
    ", hashtext($2)) THEN false ",
    "ELSE pg_advisory_xact_lock_shared(",
    crate::locks::key!(activating),
    ", hashtext($2)) IS NOT NULL END"
);

/// A projector's active and activating versions.
const STATE_AFTER_WAIT: &str =
    "SELECT active_version, activating_version FROM coord.projector_states WHERE name = $1";

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
