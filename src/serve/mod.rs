//! `coord serve`: the HTTP face of one deployment for load balancers and
//! Prometheus. `/ready` runs the publisher gate (rolled back), `/status` is
//! the [`StatusReport`] as JSON, `/metrics` is Prometheus text.
//! This module reads only; it never prints, reads the environment or creates
//! a pool: the caller hands it one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;

use crate::names::RelationName;
use crate::projector::ProjectorSet;
use crate::publisher::Publisher;
use crate::status::{status, StatusReport};
use crate::{Error, Result};

mod metrics;

use metrics::render_down;
pub use metrics::render_metrics;

/// The content type of Prometheus' text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// How long one request may wait for the database before it answers with an
/// error: a load balancer's probe must not hang on a stuck pool.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

struct ServeState {
    pool: Pool,
    publisher: Publisher,
    event_store: RelationName,
    /// Why `/ready` last answered 503 (`None` while ready): logged when it changes.
    last_cause: std::sync::Mutex<Option<String>>,
}

/// Why `/ready` answers 503, in words an operator acts on:
/// `database unreachable`, `coord schema missing: run coord migrate`, or the
/// gate's refusal (`NewerProjectorIsActive (CO001): projector ...`).
pub fn not_ready_cause(error: &Error) -> String {
    let db = match error {
        Error::Db(e) => Some(e),
        Error::Pool(deadpool_postgres::PoolError::Backend(e)) => Some(e),
        _ => None,
    };
    if let Some(e) = db {
        return match e.code().map(tokio_postgres::error::SqlState::code) {
            // schema "coord" / relation / function does not exist
            Some("3F000" | "42P01" | "42883") => {
                "coord schema missing: run coord migrate".to_owned()
            }
            Some(code) => format!(
                "database error {code}: {}",
                e.as_db_error().map_or("", |d| d.message())
            ),
            None => "database unreachable".to_owned(),
        };
    }
    match error {
        Error::Pool(_) | Error::Timeout(_) => "database unreachable".to_owned(),
        // A gate refusal's text starts with its name and code already.
        _ => error.to_string(),
    }
}

/// The routes `GET /ready`, `GET /status` and `GET /metrics` for the
/// configuration `projectors`, reading the event store `event_store` through
/// `pool`.
///
/// * `/ready`: 200 `{"ready":true,"inline":[...]}` only while this
///   configuration may publish now; otherwise 503
///   `{"ready":false,"cause":...,"error":...,"sqlstate":...,"exit_code":...,"retryable":...}`
///   with `cause` from [`not_ready_cause`], logged when it changes.
/// * `/status`: the [`StatusReport`] as JSON; 500 with the error otherwise.
/// * `/metrics`: [`render_metrics`] as [`METRICS_CONTENT_TYPE`]; `coord_up 0`
///   and `coord_ready 0` (HTTP 200) when coord's state cannot be read.
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool, config: coord::Config) -> coord::Result<()> {
/// let router = coord::serve::router(
///     pool,
///     coord::ProjectorSet::from_config(&config),
///     config.event_store.clone(),
/// );
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080")
///     .await
///     .map_err(|e| coord::Error::Failed(e.to_string()))?;
/// coord::serve::serve(listener, router, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await
/// # }
/// ```
pub fn router(pool: Pool, projectors: ProjectorSet, event_store: RelationName) -> Router {
    let state = Arc::new(ServeState {
        pool,
        publisher: Publisher::new(projectors),
        event_store,
        last_cause: std::sync::Mutex::new(None),
    });
    Router::new()
        .route("/ready", get(ready_handler))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the
/// requests in flight finish.
///
/// # Errors
/// [`Error::Failed`] when the server fails to accept connections.
pub async fn serve<F>(listener: tokio::net::TcpListener, router: Router, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Failed(format!("http server failed: {e}")))
}

/// Whether `publisher`'s configuration may publish now: runs the gate for any
/// event type in a transaction that is rolled back. Returns the projectors
/// that would run inline.
///
/// # Errors
/// The gate refusals ([`Error::NewerProjectorIsActive`] and its siblings);
/// [`Error::Pool`] and database errors when the database is unreachable.
pub async fn readiness(pool: &Pool, publisher: &Publisher) -> Result<Vec<String>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let inline = publisher.check(&tx, None).await;
    tx.rollback().await?;
    inline
}

async fn with_deadline<T>(what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(REQUEST_DEADLINE, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout(format!(
                "{what} did not answer within {REQUEST_DEADLINE:?}: the database is slow or unreachable"
            )))
        })
}

async fn ready_handler(State(state): State<Arc<ServeState>>) -> Response {
    let result = with_deadline("readiness check", readiness(&state.pool, &state.publisher)).await;
    let cause = result.as_ref().err().map(not_ready_cause);
    {
        let mut last = state.last_cause.lock().unwrap_or_else(|e| e.into_inner());
        if *last != cause {
            match &cause {
                Some(cause) => tracing::warn!(%cause, "/ready answers 503"),
                None => tracing::info!("/ready answers 200"),
            }
            last.clone_from(&cause);
        }
    }
    match result {
        Ok(inline) => (
            StatusCode::OK,
            Json(serde_json::json!({ "ready": true, "inline": inline })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "ready": false,
                "cause": cause,
                "error": e.to_string(),
                "sqlstate": e.sqlstate(),
                "exit_code": e.exit_code(),
                "retryable": e.is_retryable(),
            })),
        )
            .into_response(),
    }
}

async fn read_status(state: &ServeState) -> Result<StatusReport> {
    let client = state.pool.get().await?;
    status(&**client, &state.event_store).await
}

async fn status_handler(State(state): State<Arc<ServeState>>) -> Response {
    match with_deadline("status", read_status(&state)).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics_handler(State(state): State<Arc<ServeState>>) -> Response {
    let (ready, report) = futures_util::future::join(
        with_deadline("readiness check", readiness(&state.pool, &state.publisher)),
        with_deadline("status", read_status(&state)),
    )
    .await;
    let body = match report {
        Ok(report) => render_metrics(&report, ready.is_ok()),
        Err(e) => {
            // Still a scrape: Prometheus alerts on `coord_up == 0`, not on a
            // failed scrape it cannot tell from a dead process.
            tracing::warn!(cause = %not_ready_cause(&e), "/metrics: cannot read coord's state");
            render_down()
        }
    };
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}
