//! The critical section (docs/decisions/0003-gate-locks.md,
//! 0034-critical-section-attempts.md): the only code that changes which
//! version of a projector is active. Activation, retirement, rollback and
//! rebuild all go through [`critical_section`]: hold back the publishers of
//! the affected event types, apply the last events, wait out in-flight
//! publishers, write the change, commit; in short attempts that release
//! everything when a lock is not granted in time. Also the one way back from
//! activating (or retired) to replaying, [`back_to_replaying`].

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::{GenericClient, Transaction};

use super::lock::{fence, ActivationLock};
use crate::gate::{self, LockPolicy};
use crate::names::{quote_ident, RelationName};
use crate::projector::{Projector, ProjectorExt};
use crate::replay;
use crate::store::versions::{self, VersionRecord, VersionStatus};
use crate::store::{checkpoint, history, states, Actor};
use crate::{Error, Result};

/// What a critical section changes.
pub(crate) enum Change<'a> {
    /// The activating version of `projector` becomes active; `old`, the
    /// version active before, is retired.
    Activate {
        /// The version to activate.
        projector: &'a dyn Projector,
        /// The active version it replaces.
        old: Option<&'a VersionRecord>,
    },
    /// The active and activating versions `records` of projector `name` are
    /// retired (or aborted); a replay in progress is kept.
    Retire {
        /// The projector.
        name: &'a str,
        /// Its active and activating versions.
        records: &'a [VersionRecord],
    },
    /// The tables of `shadow`, `projector` rebuilt in a schema of its own,
    /// replace the active version's: the live schema is renamed to
    /// `retired_schema` and the shadow's takes its name.
    Rebuild {
        /// The active version.
        projector: &'a dyn Projector,
        /// The same definition under the shadow version.
        shadow: &'a dyn Projector,
        /// The name the live schema is renamed to.
        retired_schema: &'a str,
        /// `lock_timeout` of the renames (readers of the tables hold locks).
        rename_timeout: Duration,
    },
}

impl Change<'_> {
    fn name(&self) -> &str {
        match self {
            Change::Activate { projector, .. } | Change::Rebuild { projector, .. } => {
                projector.name().as_str()
            }
            Change::Retire { name, .. } => name,
        }
    }

    /// The event types whose publishers are held back, sorted and unique.
    fn event_types(&self) -> Vec<String> {
        let mut types = match self {
            Change::Activate { projector, old } => {
                let mut types = projector.event_types();
                if let Some(old) = old {
                    types.extend(old.event_types.iter().cloned());
                }
                types
            }
            Change::Retire { records, .. } => records
                .iter()
                .flat_map(|r| r.event_types.iter().cloned())
                .collect(),
            Change::Rebuild { projector, .. } => projector.event_types(),
        };
        types.sort();
        types.dedup();
        types
    }

    /// The error when the deadline passes.
    fn deadline_passed(&self, deadline: Duration, attempts: u32) -> Error {
        let (operation, after) = match self {
            Change::Activate { projector, .. } => (
                format!("activate {}", projector.label()),
                "; it is back to replaying",
            ),
            Change::Retire { name, .. } => {
                (format!("retire projector {name}"), "; nothing changed")
            }
            Change::Rebuild { projector, .. } => (
                format!("swap in the rebuilt tables of {}", projector.label()),
                "; nothing changed",
            ),
        };
        Error::LockDeadline {
            operation,
            deadline,
            attempts,
            after,
        }
    }

    /// The version whose final events are applied inside, if any.
    fn catching_up(&self) -> Option<&dyn Projector> {
        match self {
            Change::Activate { projector, .. } => Some(*projector),
            Change::Rebuild { shadow, .. } => Some(*shadow),
            Change::Retire { .. } => None,
        }
    }

    /// Writes the change, with publishers held back and drained.
    async fn write(&self, tx: &Transaction<'_>, actor: &Actor) -> Result<()> {
        let name = self.name();
        match self {
            Change::Activate { projector, old } => {
                let version = projector.version().to_string();
                let why = format!("{version} is active");
                let retire_old = async {
                    match old {
                        Some(old) => {
                            set_status(
                                tx,
                                actor,
                                name,
                                &old.version,
                                VersionStatus::Active,
                                VersionStatus::Retired,
                                Some(&why),
                            )
                            .await
                        }
                        None => Ok(()),
                    }
                };
                // Publishers wait for this commit: the writes are pipelined.
                futures_util::try_join!(
                    states::activate(tx, name, &version),
                    set_status(
                        tx,
                        actor,
                        name,
                        &version,
                        VersionStatus::Activating,
                        VersionStatus::Active,
                        None,
                    ),
                    retire_old,
                )?;
            }
            Change::Retire { records, .. } => {
                states::retire(tx, name).await?;
                for record in *records {
                    let to = if record.status == VersionStatus::Active {
                        VersionStatus::Retired
                    } else {
                        VersionStatus::Aborted
                    };
                    let why = Some("no longer configured");
                    set_status(tx, actor, name, &record.version, record.status, to, why).await?;
                }
            }
            Change::Rebuild {
                projector,
                shadow,
                retired_schema,
                rename_timeout,
            } => {
                let (live, version) = (projector.schema(), projector.version().to_string());
                tx.batch_execute(&format!(
                    "SET LOCAL lock_timeout = '{}ms'; ALTER SCHEMA {} RENAME TO {}; ALTER SCHEMA {} RENAME TO {}; \
                     SET LOCAL lock_timeout = 0",
                    rename_timeout.as_millis().max(1),
                    quote_ident(&live),
                    quote_ident(retired_schema),
                    quote_ident(&shadow.schema()),
                    quote_ident(&live),
                ))
                .await?;
                // The active version inherits the shadow's checkpoint (async
                // versions are followed from it); the shadow's registration goes.
                let shadow_version = shadow.version().to_string();
                checkpoint::adopt(tx, name, &shadow_version, &version).await?;
                versions::delete(tx, name, &shadow_version).await?;
                states::activate(tx, name, &version).await?;
                let why = Some("rebuilt in place");
                set_status(
                    tx,
                    actor,
                    name,
                    &version,
                    VersionStatus::Active,
                    VersionStatus::Active,
                    why,
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// Sets the status of `name@version` and records the transition.
async fn set_status(
    tx: &impl GenericClient,
    actor: &Actor,
    name: &str,
    version: &str,
    from: VersionStatus,
    to: VersionStatus,
    why: Option<&str>,
) -> Result<()> {
    // Pipelined: each is one round trip (unprepared, typed).
    futures_util::try_join!(
        versions::set_status(tx, name, version, to),
        history::record(tx, actor, name, Some(version), Some(from), to, why),
    )?;
    Ok(())
}

/// Carries out `change` in attempts that each either complete it or
/// release everything: each attempt waits at most `policy.attempt_timeout`
/// for each lock, and gives up with [`Error::LockDeadline`] after `policy.deadline`.
/// Every attempt proves that `lock` is still held. Returns the events
/// applied inside and the milliseconds of the successful attempt.
///
/// # Errors
/// [`Error::LockDeadline`] at the deadline; handler, fencing and database errors.
pub(crate) async fn critical_section(
    pool: &Pool,
    change: &Change<'_>,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
    lock: Option<&ActivationLock>,
) -> Result<(u64, f64)> {
    let mut pooled = pool.get().await?;
    critical_section_on(&mut pooled, change, event_store, policy, actor, lock, None).await
}

/// [`critical_section`] on `client`, a connection the caller holds. With
/// `then`, a statement sent in the same message as the successful
/// attempt's `COMMIT`, so the server runs it the moment the change commits,
/// without waiting for the client (the activation marker's release, so
/// that refused publishers wake without that round trip); it does not run
/// when the `COMMIT` fails.
///
/// # Errors
/// As [`critical_section`].
pub(crate) async fn critical_section_on(
    client: &mut tokio_postgres::Client,
    change: &Change<'_>,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
    lock: Option<&ActivationLock>,
    then: Option<&str>,
) -> Result<(u64, f64)> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt_started = Instant::now();
        let mut tx = client.transaction().await?;
        match attempt(&mut tx, change, event_store, policy, actor, lock).await {
            Ok(Some(final_events)) => {
                match then {
                    // A simple-query batch stops at its first error: `then`
                    // runs only once the change has committed. The `BEGIN`
                    // after it leaves `tx` an empty transaction to end.
                    Some(then) => {
                        tx.batch_execute(&format!("COMMIT; {then}; BEGIN")).await?;
                        // The change has committed: ending the empty
                        // transaction cannot undo it, so its error is no
                        // failure of the critical section.
                        if let Err(e) = tx.commit().await {
                            tracing::debug!(error = %e, "could not end the transaction after the commit");
                        }
                    }
                    None => tx.commit().await?,
                }
                if attempts > 1 {
                    tracing::info!(attempts, "critical section completed after retries");
                }
                return Ok((final_events, attempt_started.elapsed().as_secs_f64() * 1e3));
            }
            Ok(None) => {
                // Release every lock before waiting: publishers of the
                // projector's types get through (or ProjectorIsActivating) at once.
                tx.rollback().await?;
                if started.elapsed() >= policy.deadline {
                    return Err(change.deadline_passed(policy.deadline, attempts));
                }
                tokio::time::sleep(policy.pause).await;
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
    }
}

/// One attempt: `Ok(None)` when a lock was not granted within the attempt
/// timeout (the caller rolls back).
async fn attempt(
    tx: &mut Transaction<'_>,
    change: &Change<'_>,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
    lock: Option<&ActivationLock>,
) -> Result<Option<u64>> {
    // Pipelined: the fence and the first lock attempt are one round trip.
    let types = change.event_types();
    let (_, held) = futures_util::try_join!(
        fence(lock, &*tx, "the critical section"),
        gate::try_hold_back_publishers(tx, &types, policy)
    )?;
    if !held {
        return Ok(None);
    }
    let final_events = match change.catching_up() {
        Some(projector) => replay::pass_in_transaction(tx, projector, event_store).await?,
        None => 0,
    };
    // The old version keeps its own exact checkpoint (its publishers recorded
    // what they applied inline), so a later rollback catches it up from there.
    if !gate::try_drain_all_publishers(tx, policy).await? {
        return Ok(None);
    }
    change.write(tx, actor).await?;
    Ok(Some(final_events))
}

/// Inside the caller's transaction, with the projector's state row read for
/// update: `version` of `name`, now `from` (activating, or retired for a
/// rollback), goes back to replaying, with a transition saying `why`; the
/// active version is kept.
///
/// # Errors
/// Database errors.
pub(crate) async fn back_to_replaying(
    tx: &impl GenericClient,
    name: &str,
    version: &str,
    from: VersionStatus,
    actor: &Actor,
    why: &str,
) -> Result<()> {
    states::start_replaying(tx, name, version).await?;
    set_status(
        tx,
        actor,
        name,
        version,
        from,
        VersionStatus::Replaying,
        Some(why),
    )
    .await
}
