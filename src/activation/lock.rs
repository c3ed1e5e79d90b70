//! One activation at a time (invariant 6): a session advisory lock held on a
//! dedicated connection (never a pooled one, whose recycling could keep or
//! drop it behind our back). Losing the connection releases it, so a killed
//! process never leaves it held.
//!
//! Losing it is noticed (docs/decisions/0033-activation-fencing.md): the
//! lock's connection watches itself and reports its end through
//! [`ActivationLock::lost`], and every state change made under the lock runs
//! [`ActivationLock::fence`] in its own transaction, which fails unless this
//! lock's backend still holds the lock. The fence takes a shared advisory key
//! that a new holder takes exclusively right after acquiring the lock, so a
//! fenced transaction that passed its check commits before the next holder
//! reads anything.
//!
//! Work left by a process that died (docs/decisions/0060-orphaned-work.md):
//! a backend whose `application_name` says it belongs to a coord process of
//! this host that no longer runs can only end; [`end_orphans`] ends it
//! (`pg_terminate_backend`) and waits for it, bounded, naming it, before the
//! lock is taken or a replay starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseUrl;
use crate::locks::key;
use crate::store::Actor;
use crate::{Error, Result};

/// How long the work of a dead process may take to end before giving up.
pub const ORPHAN_WAIT: Duration = Duration::from_secs(30);
/// Backends of this database named by a coord process.
const COORD_BACKENDS: &str = "SELECT pid, application_name, backend_start::text \
    FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
    AND application_name LIKE 'coord%'";
/// How often the lock's connection is checked for having ended.
const WATCH_EVERY: Duration = Duration::from_millis(20);
const TRY_LOCK: &str = concat!("SELECT pg_try_advisory_lock(", key!(activation), ", 0)");
/// Waits for the fenced transactions of a previous holder to end.
const WAIT_FOR_FENCED: &str = concat!(
    "SELECT pg_advisory_lock(",
    key!(activation),
    ", 1); SELECT pg_advisory_unlock(",
    key!(activation),
    ", 1)"
);
/// In a fenced transaction: the shared fence key, then whether the backend
/// `$1` still holds the activation lock.
const FENCE: &str = concat!(
    "SELECT pg_advisory_xact_lock_shared(",
    key!(activation),
    ", 1), EXISTS (SELECT 1 FROM pg_locks l \
    WHERE l.locktype = 'advisory' AND l.classid = ",
    key!(activation),
    " AND l.objid = 0 AND l.objsubid = 2 \
    AND l.granted AND l.pid = $1 \
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
);
const HOLDER: &str = concat!(
    "SELECT a.application_name, coalesce(a.client_addr::text, 'local'), \
    coord.iso(a.backend_start), a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
    WHERE l.locktype = 'advisory' AND l.classid = ",
    key!(activation),
    " AND l.objid = 0 AND l.granted \
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1"
);

/// The held activation lock; dropping it releases it.
pub struct ActivationLock {
    client: Arc<Client>,
    pid: i32,
    lost: CancellationToken,
    released: Arc<AtomicBool>,
}

impl std::fmt::Debug for ActivationLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActivationLock(pid {})", self.pid)
    }
}

impl ActivationLock {
    /// Takes the lock, waiting up to `wait` for another holder to finish.
    ///
    /// # Errors
    /// [`Error::Busy`] (exit code 7) naming the holder when `wait` passes;
    /// database errors.
    pub async fn acquire(url: &DatabaseUrl, actor: &Actor, wait: Duration) -> Result<Self> {
        let mut config = url.pg_config();
        let name = crate::db::owner_name(&actor.command, &actor.host, std::process::id());
        config.application_name(name);
        let client = Arc::new(crate::db::connect_with(url, config).await?);
        let lost = CancellationToken::new();
        let released = Arc::new(AtomicBool::new(false));
        {
            // The connection task belongs to crate::db: watch the client
            // instead (closed once that task ends).
            let (lost, released, watched) =
                (lost.clone(), released.clone(), Arc::downgrade(&client));
            tokio::spawn(async move {
                loop {
                    match watched.upgrade() {
                        Some(client) if !client.is_closed() => {}
                        Some(_) => {
                            if !released.load(Ordering::SeqCst) {
                                tracing::warn!("activation lock connection lost");
                            }
                            break;
                        }
                        None => break,
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
                lost.cancel();
            });
        }
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .try_get(0)?;
        let started = Instant::now();
        loop {
            let got: bool = client.query_one(TRY_LOCK, &[]).await?.try_get(0)?;
            if got {
                // A previous holder that lost the lock may be inside a fenced
                // transaction that already passed its check: let it end first.
                client.batch_execute(WAIT_FOR_FENCED).await?;
                // A dead run's batches may still hold row locks.
                end_orphans(&client, ORPHAN_WAIT).await?;
                return Ok(Self {
                    client,
                    pid,
                    lost,
                    released,
                });
            }
            // The holder may be the connection of a run that died: its lock
            // goes when that backend ends.
            if end_orphans(&client, ORPHAN_WAIT).await? > 0 {
                continue;
            }
            if started.elapsed() >= wait {
                let holder = match client.query_opt(HOLDER, &[]).await? {
                    Some(row) => format!(
                        "{} (pid {}, from {}, since {})",
                        row.try_get::<_, String>(0)?,
                        row.try_get::<_, i32>(3)?,
                        row.try_get::<_, String>(1)?,
                        row.try_get::<_, String>(2)?
                    ),
                    None => "another process".to_owned(),
                };
                return Err(Error::Busy(format!(
                    "another activation holds the lock: {holder}; wait for it to finish and retry (or pass --lock-wait)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server process id of the connection holding the lock.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Cancelled when the lock's connection ends (its backend was
    /// terminated, the server restarted, the network failed): from then on
    /// another run may hold the lock.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The error of a run that lost the lock.
    pub fn lost_error(&self, during: &str) -> Error {
        Error::Failed(format!(
            "lost the activation lock (its connection, server pid {}, ended) during {during}; stopped before \
             committing anything more; another run may hold it now: run `coord activate-current-config` again \
             (it finishes or resumes what this one left)",
            self.pid
        ))
    }

    /// The fencing check: call it inside every transaction that changes
    /// state under the lock, before its first write. It fails unless this
    /// lock's backend still holds the lock, and keeps the next holder from
    /// reading anything until the transaction ends.
    ///
    /// # Errors
    /// [`Error::Failed`] when the lock was lost; database errors.
    pub async fn fence(&self, tx: &impl GenericClient, during: &str) -> Result<()> {
        if self.lost.is_cancelled() {
            return Err(self.lost_error(during));
        }
        // Unprepared and typed: one round trip, pipelined by the callers.
        let rows = tx
            .query_typed(FENCE, &[(&self.pid, tokio_postgres::types::Type::INT4)])
            .await?;
        let held: bool = match rows.first() {
            Some(row) => row.try_get(1)?,
            None => false,
        };
        if held {
            Ok(())
        } else {
            Err(self.lost_error(during))
        }
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// Database errors (the lock is released anyway when the connection closes).
    pub async fn release(self) -> Result<()> {
        self.released.store(true, Ordering::SeqCst);
        self.client
            .batch_execute(concat!(
                "SELECT pg_advisory_unlock(",
                key!(activation),
                ", 0)"
            ))
            .await?;
        Ok(())
    }
}

impl Drop for ActivationLock {
    fn drop(&mut self) {
        // Closing on purpose (an error path) is not a loss worth a warning.
        self.released.store(true, Ordering::SeqCst);
    }
}

/// Ends the backends of this database that belong to coord processes of
/// this host that no longer run ([`crate::db::owner_is_gone`]): a batch, a
/// held lock or an open transaction of a killed run. Each is named in a
/// warning and terminated (`pg_terminate_backend`; without the privilege to,
/// its own end is awaited: the server notices a dead client within seconds,
/// [`crate::db`]); returns how many there were.
///
/// # Errors
/// [`Error::Busy`] (exit code 7) naming those still running after `bound`;
/// database errors.
pub async fn end_orphans(client: &Client, bound: Duration) -> Result<usize> {
    let started = Instant::now();
    let mut ended: Vec<i32> = Vec::new();
    loop {
        let mut left = Vec::new();
        for row in client.query(COORD_BACKENDS, &[]).await? {
            let name: String = row.try_get(1)?;
            if crate::db::owner_is_gone(&name) {
                let pid: i32 = row.try_get(0)?;
                let since: String = row.try_get(2)?;
                left.push((pid, format!("{name} (server pid {pid}, since {since})")));
            }
        }
        if left.is_empty() {
            return Ok(ended.len());
        }
        if started.elapsed() >= bound {
            let names: Vec<&str> = left.iter().map(|(_, name)| name.as_str()).collect();
            return Err(Error::Busy(format!(
                "the work of coord processes that no longer run did not end within {} s: {}; \
                 end it with SELECT pg_terminate_backend(pid) and retry",
                bound.as_secs(),
                names.join(", ")
            )));
        }
        for (pid, name) in &left {
            if ended.contains(pid) {
                continue;
            }
            ended.push(*pid);
            tracing::warn!(
                backend = %name,
                "ending the work of a coord process that no longer runs"
            );
            if let Err(e) = client
                .execute("SELECT pg_terminate_backend($1)", &[pid])
                .await
            {
                tracing::warn!(backend = %name, error = %e, "cannot terminate it; waiting for it to end");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fence that may be absent (library calls made without the lock).
pub(crate) async fn fence(
    lock: Option<&ActivationLock>,
    tx: &impl GenericClient,
    during: &str,
) -> Result<()> {
    match lock {
        Some(lock) => lock.fence(tx, during).await,
        None => Ok(()),
    }
}
