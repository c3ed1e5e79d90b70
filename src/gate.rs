//! The publisher gate and its lock protocol (docs/decisions/0003-gate-locks.md).
//! Publishers check it through `coord.gate` (SQL, shipped by migration V2);
//! activation holds publishers back with the exclusive side of the same locks.
//! This module never writes a coord table.

use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::locks::key;
use crate::names::quote_literal;
use crate::{Error, Result};

/// Runs the gate for configuration `projectors` (`{"name": "version"}`)
/// publishing `event_types` (`None`: any type). Returns the names of the
/// configuration's projectors active at its versions, which the publisher
/// must run inline.
///
/// Call it inside the publishing transaction, before appending; the shared
/// locks it takes last until that transaction ends.
///
/// # Errors
/// The four gate refusals ([`Error::NewerProjectorIsActive`] and its
/// siblings); database errors.
pub async fn check(
    client: &impl GenericClient,
    projectors: &serde_json::Value,
    event_types: Option<&[String]>,
) -> Result<Vec<String>> {
    // Typed and unprepared: sent in one flight, so it stays ahead of
    // statements the caller pipelines after it.
    let rows = client
        .query_typed(
            GATE,
            &[(projectors, Type::JSONB), (&event_types, Type::TEXT_ARRAY)],
        )
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::Failed("coord.gate returned no row".into()))?;
    Ok(row.try_get(0)?)
}

/// The gate statement the publisher pipelines with its append.
const GATE: &str = "SELECT coord.gate_inline($1::jsonb, $2::text[])";

/// The exclusive keys of activation, in the gate's order: event types by
/// hash, then the wildcard key.
fn hold_back_sql(event_types: &[String]) -> String {
    let types: Vec<String> = event_types.iter().map(|t| quote_literal(t)).collect();
    format!(
        concat!(
            "SELECT count(pg_advisory_xact_lock(",
            key!(gate_event_type),
            ", h)) FROM (SELECT DISTINCT hashtext(t) AS h \
             FROM unnest(ARRAY[{}]::text[]) AS t ORDER BY 1) AS keys; \
             SELECT pg_advisory_xact_lock(",
            key!(gate_publishers),
            ", 1)"
        ),
        types.join(", ")
    )
}
const LOCK_GLOBAL_EXCLUSIVE: &str = concat!(
    "SELECT pg_advisory_xact_lock(",
    key!(gate_publishers),
    ", 0)"
);

/// How long each lock wait may last before it is abandoned and retried, and
/// how long to keep retrying.
#[derive(Clone, Copy, Debug)]
pub struct LockPolicy {
    /// `lock_timeout` of one attempt. Publishers arriving while an exclusive
    /// request waits queue behind it for at most this long.
    pub attempt_timeout: Duration,
    /// Pause between attempts, letting queued publishers through.
    pub pause: Duration,
    /// Give up with [`Error::LockDeadline`] after this long.
    pub deadline: Duration,
}

impl Default for LockPolicy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_millis(20),
            pause: Duration::from_millis(5),
            deadline: Duration::from_secs(10),
        }
    }
}

/// Holds back every publisher of `event_types` (and those that publish
/// without naming types) until `tx` ends: waits, in bounded retried attempts,
/// for the ones in flight to finish.
///
/// # Errors
/// [`Error::LockDeadline`] when the deadline passes; database errors.
pub async fn hold_back_publishers(
    tx: &mut Transaction<'_>,
    event_types: &[String],
    policy: LockPolicy,
) -> Result<()> {
    with_bounded_waits(
        tx,
        policy,
        "publishers of these event types",
        &hold_back_sql(event_types),
    )
    .await
}

/// Waits (bounded, retried) until no publisher of any type is between its
/// gate check and its commit, and keeps new ones out until `tx` ends. Hold it
/// only for the flip of `active_version`.
///
/// # Errors
/// [`Error::LockDeadline`] when the deadline passes; database errors.
pub async fn drain_all_publishers(tx: &mut Transaction<'_>, policy: LockPolicy) -> Result<()> {
    with_bounded_waits(tx, policy, "all publishers", LOCK_GLOBAL_EXCLUSIVE).await
}

/// One bounded attempt at holding back every publisher of `event_types`
/// (and those that name no types): `Ok(false)` when `policy.attempt_timeout`
/// passed first, the transaction still usable and holding nothing new.
///
/// # Errors
/// Database errors.
pub async fn try_hold_back_publishers(
    tx: &Transaction<'_>,
    event_types: &[String],
    policy: LockPolicy,
) -> Result<bool> {
    attempt_once(tx, policy, &hold_back_sql(event_types)).await
}

/// One bounded attempt at [`drain_all_publishers`]: `Ok(false)` when
/// `policy.attempt_timeout` passed first (an in-flight transaction holds the
/// shared global key).
///
/// # Errors
/// Database errors.
pub async fn try_drain_all_publishers(tx: &Transaction<'_>, policy: LockPolicy) -> Result<bool> {
    attempt_once(tx, policy, LOCK_GLOBAL_EXCLUSIVE).await
}

fn attempt_sql(policy: LockPolicy, lock_sql: &str) -> String {
    let timeout_ms = policy.attempt_timeout.as_millis().max(1);
    format!(
        "SAVEPOINT coord_lock; SET LOCAL lock_timeout = '{timeout_ms}ms'; {lock_sql}; \
         SET LOCAL lock_timeout = 0; RELEASE SAVEPOINT coord_lock"
    )
}

async fn attempt_once(tx: &Transaction<'_>, policy: LockPolicy, lock_sql: &str) -> Result<bool> {
    match tx.batch_execute(&attempt_sql(policy, lock_sql)).await {
        Ok(()) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT coord_lock; RELEASE SAVEPOINT coord_lock")
                .await?;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `lock_sql` inside a savepoint with a short `lock_timeout`, retrying
/// until the deadline. Each attempt is one round trip (a simple-query batch);
/// locks taken before stay held across retries.
async fn with_bounded_waits(
    tx: &mut Transaction<'_>,
    policy: LockPolicy,
    what: &str,
    lock_sql: &str,
) -> Result<()> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match attempt_once(tx, policy, lock_sql).await {
            Ok(true) => {
                if attempts > 1 {
                    tracing::debug!(
                        attempts,
                        waited_ms = started.elapsed().as_millis() as u64,
                        what,
                        "lock acquired"
                    );
                }
                return Ok(());
            }
            Ok(false) => {
                if started.elapsed() >= policy.deadline {
                    return Err(Error::LockDeadline {
                        operation: format!("hold back {what}"),
                        deadline: policy.deadline,
                        attempts,
                        after: "",
                    });
                }
                tokio::time::sleep(policy.pause).await;
            }
            Err(e) => return Err(e),
        }
    }
}

const ACTIVE_FINGERPRINTS: &str = "SELECT v.name, v.version, v.fingerprint \
    FROM coord.projector_states s JOIN coord.projector_versions v \
    ON v.name = s.name AND v.version = s.active_version";

/// Refuses, like the gate, a configuration whose projector runs the active
/// version with another definition: for waits and checks that do not
/// publish. Reads only; takes no lock.
///
/// # Errors
/// [`Error::ProjectorDefinitionMismatch`]; database errors.
pub async fn ensure_same_definitions(
    client: &impl GenericClient,
    projectors: &crate::projector::ProjectorSet,
) -> Result<()> {
    for row in client.query(ACTIVE_FINGERPRINTS, &[]).await? {
        let (name, version, active): (String, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let Some(p) = projectors.get(&name) else {
            continue;
        };
        let fingerprint = p.fingerprint();
        if p.version().to_string() == version && fingerprint != active {
            return Err(Error::ProjectorDefinitionMismatch {
                projector: name,
                running: version,
                fingerprint,
                active_fingerprint: active,
            });
        }
    }
    Ok(())
}
