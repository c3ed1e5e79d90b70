//! `coord serve`: the router through real HTTP on a local port, and the
//! command's start, address printing, shutdown and usage errors.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use coord::{Config, ProjectorSet};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{assert_exit, balances_toml, stderr, TestDb};

/// A response as the tests need it.
struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A minimal HTTP/1.1 GET: one request per connection, read to close.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<coord::Result<()>>,
}

impl Server {
    /// Stops the server and checks it shut down cleanly.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Serves the router for `balances@version` on a free local port.
async fn start(url: &coord::DatabaseUrl, version: &str) -> Server {
    let config = Config::parse(&balances_toml(version), "coord.toml").unwrap();
    let pool = coord::pool(url, 2).unwrap();
    let router = coord::serve::router(
        pool,
        ProjectorSet::from_config(&config),
        config.event_store.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(coord::serve::serve(listener, router, async {
        let _ = stopped.await;
    }));
    Server { addr, stop, task }
}

async fn set_active(db: &TestDb, version: &str) {
    let client = db.client().await;
    // The state a deploy would reach, written directly.
    client
        .execute(
            "INSERT INTO coord.projector_states (name, active_version, updated_at) VALUES ('balances', $1, now()) \
             ON CONFLICT (name) DO UPDATE SET active_version = EXCLUDED.active_version, \
             activating_version = NULL, replaying_version = NULL, updated_at = now()",
            &[&version],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn ready_is_200_while_the_configuration_may_publish() {
    let db = TestDb::migrated().await;
    let server = start(&db.database_url(), "1.0.0").await;

    let empty = get(server.addr, "/ready").await;
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert_eq!(
        empty.json(),
        serde_json::json!({ "ready": true, "inline": [] })
    );

    set_active(&db, "1.0.0").await;
    let active = get(server.addr, "/ready").await;
    assert_eq!(active.status, 200, "{}", active.body);
    assert_eq!(active.json()["inline"], serde_json::json!(["balances"]));
    server.stop().await;
}

#[tokio::test]
async fn ready_is_503_with_co001_when_a_newer_version_is_active() {
    let db = TestDb::migrated().await;
    set_active(&db, "2.0.0").await;
    let server = start(&db.database_url(), "1.0.0").await;
    let reply = get(server.addr, "/ready").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["ready"], false);
    assert_eq!(body["sqlstate"], "CO001");
    assert!(
        body["cause"]
            .as_str()
            .unwrap()
            .starts_with("NewerProjectorIsActive (CO001): projector balances 1.0.0"),
        "{body}"
    );
    assert_eq!(body["exit_code"], 3);
    assert_eq!(body["retryable"], false);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("balances") && error.contains("1.0.0") && error.contains("2.0.0"),
        "{error}"
    );
    server.stop().await;
}

#[tokio::test]
async fn ready_is_503_with_co002_when_an_older_version_is_active() {
    let db = TestDb::migrated().await;
    set_active(&db, "1.0.0").await;
    let server = start(&db.database_url(), "2.0.0").await;
    let reply = get(server.addr, "/ready").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["ready"], false);
    assert_eq!(body["sqlstate"], "CO002");
    assert_eq!(body["exit_code"], 4);
    server.stop().await;
}

#[tokio::test]
async fn ready_is_503_when_the_database_is_unreachable() {
    // Port 1 on loopback refuses at once.
    let url = coord::DatabaseUrl::parse("postgres://postgres@127.0.0.1:1/nothing").unwrap();
    let server = start(&url, "1.0.0").await;
    let reply = get(server.addr, "/ready").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["ready"], false);
    assert!(body["sqlstate"].is_null(), "{body}");
    assert_eq!(body["exit_code"], 1);
    assert!(!body["error"].as_str().unwrap().is_empty());

    assert_eq!(body["cause"], "database unreachable", "{body}");

    // Still a scrape Prometheus can read: coord_up 0, not HTTP 500.
    let metrics = get(server.addr, "/metrics").await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(metrics.body.contains("\ncoord_up 0\n"), "{}", metrics.body);
    assert!(
        metrics.body.contains("\ncoord_ready 0\n"),
        "{}",
        metrics.body
    );
    server.stop().await;
}

/// Two versions of balances (1.0.0 active, 2.0.0 replaying) and one event.
async fn seed_two_versions(db: &TestDb) {
    let config = Config::parse(&balances_toml("1.0.0"), "coord.toml").unwrap();
    let f1 = coord::Projector::fingerprint(&coord::SqlProjector::new(config.projectors[0].clone()));
    db.client()
        .await
        .batch_execute(
            &"INSERT INTO coord.projector_states (name, active_version, replaying_version) VALUES ('balances', '1.0.0', '2.0.0');
             INSERT INTO coord.projector_versions (name, version, status, schema_name, fingerprint, event_types, mode)
             VALUES ('balances', '1.0.0', 'active', 'balances_v1_0_0', 'f1', '{AccountOpened}', 'inline'),
                    ('balances', '2.0.0', 'replaying', 'balances_v2_0_0', 'f2', '{AccountOpened}', 'inline');
             INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('a', 1, 'AccountOpened', '{}');"
                .replace("'f1'", &format!("'{f1}'")),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn status_serves_the_report_as_json() {
    let db = TestDb::migrated().await;
    seed_two_versions(&db).await;
    let server = start(&db.database_url(), "1.0.0").await;
    let reply = get(server.addr, "/status").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.content_type.starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["head_position"], 1);
    assert_eq!(body["projectors"][0]["name"], "balances");
    assert_eq!(body["projectors"][0]["active_version"], "1.0.0");
    assert_eq!(body["projectors"][0]["versions"][1]["lag"], 1);
    server.stop().await;
}

#[tokio::test]
async fn status_is_500_when_the_schema_is_not_migrated() {
    let db = TestDb::new().await;
    let server = start(&db.database_url(), "1.0.0").await;
    let reply = get(server.addr, "/status").await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert!(reply.json()["error"].is_string());
    let ready = get(server.addr, "/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(
        ready.json()["cause"],
        "coord schema missing: run coord migrate",
        "{}",
        ready.body
    );
    let metrics = get(server.addr, "/metrics").await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(metrics.body.contains("\ncoord_up 0\n"), "{}", metrics.body);
    server.stop().await;
}

#[tokio::test]
async fn metrics_report_readiness_head_position_and_per_version_gauges() {
    let db = TestDb::migrated().await;
    seed_two_versions(&db).await;

    let ready = start(&db.database_url(), "1.0.0").await;
    let reply = get(ready.addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.content_type, coord::serve::METRICS_CONTENT_TYPE);
    let text = reply.body;
    let lines: Vec<&str> = text.lines().collect();
    for expected in [
        "coord_up 1",
        "coord_ready 1",
        "coord_event_store_head_position 1",
        r#"coord_projector_events_processed{projector="balances",version="1.0.0",status="active"} 0"#,
        r#"coord_projector_events_parked{projector="balances",version="2.0.0",status="replaying"} 0"#,
        r#"coord_projector_lag{projector="balances",version="2.0.0",status="replaying"} 1"#,
        r#"coord_projector_active{projector="balances",version="1.0.0"} 1"#,
        r#"coord_projector_active{projector="balances",version="2.0.0"} 0"#,
        "# TYPE coord_ready gauge",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
    }
    // The active inline version's event was inserted by SQL, bypassing its
    // publishers: it lags by it, visibly.
    for expected in [
        r#"coord_projector_lag_events{projector="balances",version="1.0.0",status="active"} 1"#,
        r#"coord_projector_applied_inline{projector="balances",version="1.0.0",status="active"} 0"#,
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
    }
    ready.stop().await;

    let stale = start(&db.database_url(), "0.9.0").await;
    let reply = get(stale.addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.lines().any(|l| l == "coord_ready 0"),
        "{}",
        reply.body
    );
    stale.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let db = TestDb::migrated().await;
    let server = start(&db.database_url(), "1.0.0").await;
    assert_eq!(get(server.addr, "/nope").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn coord_serve_prints_the_bound_address_answers_and_stops_on_sigterm() {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let (mut child, addr) = spawn_serve(&db).await;
    assert_ne!(addr.port(), 0, "the printed address is the bound one");

    let reply = get(addr, "/ready").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["ready"], true);

    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("coord serve stops within 30s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn coord_serve_rejects_a_bad_listen_address_with_exit_2() {
    let db = TestDb::new().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let out = db.coord(&["serve", "--listen", "localhost:notaport"]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
}

#[tokio::test]
async fn coord_serve_reports_an_address_in_use_with_exit_1() {
    let db = TestDb::new().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = db.coord(&["serve", "--listen", &addr]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.to_lowercase().contains("in use"), "{err}");
}

#[tokio::test]
async fn coord_serve_logs_why_ready_is_503_once_per_change() {
    // Not migrated: the cause is the missing schema.
    let db = TestDb::new().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let (child, addr) = spawn_serve(&db).await;
    for _ in 0..3 {
        let reply = get(addr, "/ready").await;
        assert_eq!(reply.status, 503, "{}", reply.body);
    }
    sigterm(&child);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("coord serve stops within 30s of SIGTERM")
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("/ready answers 503"))
        .collect();
    assert_eq!(
        logged.len(),
        1,
        "one line for three probes with one cause:\n{log}"
    );
    assert!(
        logged[0].contains("coord schema missing: run coord migrate"),
        "{log}"
    );
}

/// Starts `coord serve` on a free port in `db`'s directory; returns the
/// child and the address it printed.
async fn spawn_serve(db: &TestDb) -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .current_dir(db.dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("coord serve prints its address within 30s")
        .unwrap()
        .expect("a line on stdout");
    let addr: SocketAddr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// Sends SIGTERM to that child's own pid.
fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
}
