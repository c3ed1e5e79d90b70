//! Connections, made only when the caller asks: a single client, or a pool
//! the caller owns. No TLS (coord talks to a local or private-network server;
//! see docs/decisions/0004-no-tls.md).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseUrl;
use crate::{Error, Result};

/// Connects once, retrying a refused or reset connection with backoff for up
/// to `deadline`. The connection task runs on the current tokio runtime.
///
/// # Errors
/// [`Error::Db`] when the server refuses the login or the deadline passes.
pub async fn connect(url: &DatabaseUrl, deadline: Duration) -> Result<Client> {
    let config = url.pg_config();
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                return Ok(client);
            }
            Err(e) if e.as_db_error().is_none() && started.elapsed() + backoff < deadline => {
                tracing::debug!(error = %e, "connect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(Error::Db(e)),
        }
    }
}

/// A pool of up to `size` connections. Nothing connects until a connection
/// is asked for.
///
/// # Errors
/// [`Error::InvalidInput`] when the pool cannot be built.
pub fn pool(url: &DatabaseUrl, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        url.pg_config(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot build a connection pool: {e}")))
}
