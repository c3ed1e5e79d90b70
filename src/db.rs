//! Connections, made only when the caller asks: a single client, or a pool
//! the caller owns; TLS as the URL's `sslmode` and `sslrootcert` say, with
//! libpq's meanings ([`crate::tls`], docs/decisions/0022-tls.md).
//!
//! Every connection is named and watched (docs/decisions/0060-orphaned-work.md):
//! its `application_name` says which command, host and process own it
//! ([`owner`]), TCP keepalives run on both ends, and the server
//! checks the client is still there during long statements
//! (`client_connection_check_interval`, PostgreSQL 14 and later), so the work
//! of a process that died ends within seconds instead of holding locks.

mod owner;

use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseUrl;
use crate::{Error, Result};

#[cfg(feature = "cli")]
pub(crate) use owner::name_connections;
pub(crate) use owner::{application_name, owner_is_gone, owner_name};

/// Connects once, retrying a refused or reset connection with backoff, and
/// gives up when `deadline` has passed since the first attempt (DNS lookup,
/// TCP connect and login included). The connection task runs on the current
/// tokio runtime.
///
/// # Errors
/// [`Error::Db`] when the server answers with an error (a refused login, a
/// database that does not exist); [`Error::Failed`] naming the host and port
/// when no server accepted a connection within `deadline`.
pub async fn connect(url: &DatabaseUrl, deadline: Duration) -> Result<Client> {
    let config = url.pg_config();
    let tls = tls_connector(url)?;
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut last_error: Option<tokio_postgres::Error> = None;
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(unreachable(url, deadline, last_error.as_ref()));
        }
        match tokio::time::timeout(left, config.connect(tls.clone())).await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                client.batch_execute(SESSION_SETTINGS).await?;
                return Ok(client);
            }
            Ok(Err(e)) if e.as_db_error().is_some() => return Err(Error::Db(e)),
            Ok(Err(e)) if is_tls_failure(&e) => return Err(tls_failure(url, &e)),
            Ok(Err(e)) if started.elapsed() + backoff < deadline => {
                tracing::debug!(error = %e, "connect failed; retrying");
                last_error = Some(e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Ok(Err(e)) => return Err(unreachable(url, deadline, Some(&e))),
            Err(_) => return Err(unreachable(url, deadline, last_error.as_ref())),
        }
    }
}

/// One connection attempt with `config` (the settings of `url`, perhaps
/// adjusted), bounded by about twice the URL's `connect_timeout` when it has
/// one (the TCP connect, then TLS and login). For connections outside a pool
/// that must not retry, such as the activation lock's.
///
/// # Errors
/// [`Error::Db`] when the server answers with an error; [`Error::Failed`]
/// naming the host and port otherwise.
pub(crate) async fn connect_with(
    url: &DatabaseUrl,
    config: tokio_postgres::Config,
) -> Result<Client> {
    let bound = config
        .get_connect_timeout()
        .map(|t| *t * 2 + Duration::from_secs(1));
    let tls = tls_connector(url)?;
    let attempt = config.connect(tls);
    let result = match bound {
        Some(bound) => match tokio::time::timeout(bound, attempt).await {
            Ok(result) => result,
            Err(_) => return Err(unreachable(url, bound, None)),
        },
        None => attempt.await,
    };
    match result {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection closed");
                }
            });
            client.batch_execute(SESSION_SETTINGS).await?;
            Ok(client)
        }
        Err(e) if e.as_db_error().is_some() => Err(Error::Db(e)),
        Err(e) if is_tls_failure(&e) => Err(tls_failure(url, &e)),
        Err(e) => Err(unreachable(url, bound.unwrap_or_default(), Some(&e))),
    }
}

/// The settings tokio-postgres uses for a connection string: everything it
/// parses, with `sslmode` and `sslrootcert` taken out and applied as libpq
/// means them.
///
/// # Errors
/// The parser's message (without the URL).
pub(crate) fn parse_pg_config(url: &str) -> std::result::Result<tokio_postgres::Config, String> {
    let (rest, tls) = crate::tls::split(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    config.ssl_mode(tls.pg_mode());
    watch(&mut config);
    Ok(config)
}

/// Client-side TCP keepalives (probing after 10 s idle, every 5 s, 3 probes)
/// where the connection string sets none, and the owner's `application_name`
/// unless it names one.
fn watch(config: &mut tokio_postgres::Config) {
    // tokio-postgres' default idle time is two hours.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name());
    }
}

/// Run on every new connection: the server ends the session's work within
/// seconds of its client going away: it checks the socket every 2 s during a
/// statement (`client_connection_check_interval`, PostgreSQL 14 and later;
/// absent before, so nothing is set there) and probes an idle link with TCP
/// keepalives. Settings the server's configuration, the role, the database or
/// the URL's `options` give are kept.
const SESSION_SETTINGS: &str = "SELECT set_config(name, CASE name \
    WHEN 'client_connection_check_interval' THEN '2s' WHEN 'tcp_keepalives_idle' THEN '10s' \
    WHEN 'tcp_keepalives_interval' THEN '5s' ELSE '3' END, false) FROM pg_settings \
    WHERE name IN ('client_connection_check_interval', 'tcp_keepalives_idle', \
    'tcp_keepalives_interval', 'tcp_keepalives_count') AND source = 'default'";

/// The TLS connector for `url`'s `sslmode` and `sslrootcert`.
fn tls_connector(url: &DatabaseUrl) -> Result<MakeRustlsConnect> {
    let (_, tls) = crate::tls::split(url.expose()).map_err(Error::InvalidInput)?;
    tls.connector().map_err(Error::InvalidInput)
}

/// Whether the TLS handshake failed (a certificate refused, a server without
/// TLS under `sslmode=require`): retrying cannot help.
pub(crate) fn is_tls_failure(e: &tokio_postgres::Error) -> bool {
    e.to_string().starts_with("error performing TLS handshake")
}

fn tls_failure(url: &DatabaseUrl, e: &tokio_postgres::Error) -> Error {
    Error::Failed(format!(
        "cannot connect to {url}: the TLS handshake with {} failed ({}); check the URL's sslmode and sslrootcert",
        endpoints(url),
        with_source(e)
    ))
}

fn with_source(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// The error for a server that did not accept a connection in time.
fn unreachable(
    url: &DatabaseUrl,
    deadline: Duration,
    cause: Option<&tokio_postgres::Error>,
) -> Error {
    let cause = cause.map_or_else(|| "no answer".to_owned(), with_source);
    Error::Failed(format!(
        "cannot connect to {url}: no PostgreSQL server at {} accepted a connection within {:.1} s ({cause}); {}",
        endpoints(url),
        deadline.as_secs_f64(),
        WHAT_TO_CHECK
    ))
}

/// What to check when a server cannot be reached.
pub(crate) const WHAT_TO_CHECK: &str = "check that the server is running, that the host name and port are right and reachable from here, or raise --connect-timeout";

/// The `host:port` pairs (or socket directories) `url` names, for messages.
pub(crate) fn endpoints(url: &DatabaseUrl) -> String {
    let config = url.pg_config();
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(dir) => {
                    format!("{}/.s.PGSQL.{port}", dir.display())
                }
            }
        })
        .collect();
    if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(", ")
    }
}

/// `url` with `connect_timeout` set to `timeout` (whole seconds, rounded up)
/// unless it already has one, so that every connection made from it, single
/// or pooled, gives up on an unreachable server in time.
///
/// # Errors
/// [`Error::InvalidInput`] when the result does not parse (it always should).
pub fn with_connect_timeout(url: &DatabaseUrl, timeout: Duration) -> Result<DatabaseUrl> {
    if url.pg_config().get_connect_timeout().is_some() {
        return Ok(url.clone());
    }
    let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    let raw = url.expose();
    let with = if raw.contains("://") {
        let separator = if raw.contains('?') { '&' } else { '?' };
        format!("{raw}{separator}connect_timeout={seconds}")
    } else {
        format!("{raw} connect_timeout={seconds}")
    };
    DatabaseUrl::parse(&with).map_err(Error::InvalidInput)
}

/// A pool of up to `size` connections. Nothing connects until a connection
/// is asked for. When `url` has a `connect_timeout`, making a connection gives
/// up after about twice that ([`with_connect_timeout`]).
///
/// # Errors
/// [`Error::InvalidInput`] when the pool cannot be built.
pub fn pool(url: &DatabaseUrl, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        url.pg_config(),
        tls_connector(url)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // A connection that cannot be made within the URL's `connect_timeout`
    // (plus the login) fails instead of waiting for the operating system.
    let create_timeout = url
        .pg_config()
        .get_connect_timeout()
        .map(|t| *t * 2 + Duration::from_secs(1));
    Pool::builder(manager)
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(SESSION_SETTINGS)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .max_size(size)
        .create_timeout(create_timeout)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot build a connection pool: {e}")))
}
