//! One activation at a time (invariant 6): a session advisory lock held on a
//! dedicated connection (never a pooled one, whose recycling could keep or
//! drop it behind our back). Losing the connection releases it, so a killed
//! process never leaves it held.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::DatabaseUrl;
use crate::store::Actor;
use crate::{Error, Result};

const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(1668247413, 0)";
const HOLDER: &str = "SELECT a.application_name, coalesce(a.client_addr::text, 'local'), \
    coord.iso(a.backend_start), a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
    WHERE l.locktype = 'advisory' AND l.classid = 1668247413 AND l.objid = 0 AND l.granted \
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1";

/// The held activation lock; dropping it releases it.
pub struct ActivationLock {
    client: Client,
}

impl std::fmt::Debug for ActivationLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivationLock")
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
        config.application_name(format!("{} on {}", actor.command, actor.host));
        let client = crate::db::connect_with(url, config).await?;
        let started = Instant::now();
        loop {
            let got: bool = client.query_one(TRY_LOCK, &[]).await?.try_get(0)?;
            if got {
                return Ok(Self { client });
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

    /// Releases the lock.
    ///
    /// # Errors
    /// Database errors (the lock is released anyway when the connection closes).
    pub async fn release(self) -> Result<()> {
        self.client
            .batch_execute("SELECT pg_advisory_unlock(1668247413, 0)")
            .await?;
        Ok(())
    }
}
