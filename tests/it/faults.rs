//! Issue 12, items 4 and 7: orphaned work dies with its process (a killed
//! replay's batch ends within seconds, an activation lock held for a dead
//! process is taken over, an immediate re-run is exact), `coord wait` is
//! bounded by its timeout, and `coord publish` reads large payloads from a
//! file or standard input. Shared helpers for the fault suite
//! (tests/it/faults_suite.rs) live here.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::support::{assert_exit, eventually, run_coord, stderr, stdout, TestDb};

/// Generous: the point is "does not hang", not a timing.
pub const DOES_NOT_HANG: Duration = Duration::from_secs(60);

/// A config-SQL projector `ledger` at `version` with `handlers` (a TOML
/// section): totals per account and how many events it applied there (an
/// event applied twice shows).
fn ledger(version: &str, handlers: &str) -> String {
    format!(
        r#"
[[projector]]
name = "ledger"
version = "{version}"
tables = """
CREATE TABLE totals (account text PRIMARY KEY, amount bigint NOT NULL, applied bigint NOT NULL);
"""

{handlers}
"#
    )
}

/// [`ledger`] with a per-event handler. With `slow`, each event first
/// sleeps `public.knob.delay` seconds, so a test can make a batch last as
/// long as it needs.
pub fn ledger_toml(version: &str, slow: bool) -> String {
    let amount = if slow {
        "($5->>'amount')::bigint + (SELECT 0 FROM pg_sleep((SELECT delay FROM public.knob)))"
    } else {
        "($5->>'amount')::bigint"
    };
    ledger(
        version,
        &format!(
            "[projector.handlers]\nDeposited = \"INSERT INTO totals VALUES ($1, {amount}, 1) ON CONFLICT (account) \
             DO UPDATE SET amount = totals.amount + EXCLUDED.amount, applied = totals.applied + 1\""
        ),
    )
}

/// [`ledger`] with a set-based batch handler instead: one statement per
/// batch, sleeping `public.knob.delay` seconds per event, so that a batch is
/// one long statement (the case a dead client is not noticed in without
/// `client_connection_check_interval`).
fn ledger_batch_toml(version: &str) -> String {
    ledger(
        version,
        "[projector.batch_handlers]\nDeposited = \"INSERT INTO totals SELECT stream_id, \
         sum((data->>'amount')::bigint + length(pg_sleep(k.delay)::text)), count(*) \
         FROM batch_events CROSS JOIN public.knob k GROUP BY stream_id ON CONFLICT (account) \
         DO UPDATE SET amount = totals.amount + EXCLUDED.amount, applied = totals.applied + EXCLUDED.applied\"",
    )
}

/// `count` deposits over 20 accounts, published through SQL in one transaction.
pub async fn deposits(client: &Client, count: i32) {
    client
        .execute(
            "SELECT coord.publish('{}'::jsonb, 'acc-' || (i % 20), NULL, \
             jsonb_build_array(jsonb_build_object('type', 'Deposited', 'data', \
             jsonb_build_object('amount', i)))) FROM generate_series(1, $1) i",
            &[&count],
        )
        .await
        .unwrap();
}

/// Rows of `schema`.totals that differ from a from-scratch computation over
/// the store (amount and number of events per account), read in one
/// snapshot; empty when the version is exact.
pub async fn differences(client: &mut Client, schema: &str) -> Vec<String> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let rows = tx
        .query(
            &format!(
                "WITH expected AS (SELECT stream_id AS account, sum((data->>'amount')::bigint) AS amount, \
                 count(*) AS applied FROM coord.events WHERE event_type = 'Deposited' GROUP BY stream_id) \
                 SELECT coalesce(e.account, t.account) || ': expected ' || coalesce(e.amount::text, 'none') \
                 || ' in ' || coalesce(e.applied::text, '0') || ' events, found ' || coalesce(t.amount::text, 'none') \
                 || ' in ' || coalesce(t.applied::text, '0') \
                 FROM expected e FULL JOIN {schema}.totals t ON t.account = e.account \
                 WHERE e.amount IS DISTINCT FROM t.amount OR e.applied IS DISTINCT FROM t.applied"
            ),
            &[],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// The schema of ledger@`version`.
pub fn schema(version: &str) -> String {
    coord::schema_name(
        &coord::ProjectorName::new("ledger").unwrap(),
        &semver::Version::parse(version).unwrap(),
    )
}

/// Kills `child` (the coord process itself, not a shell) with SIGKILL and
/// reaps it, so its pid no longer runs.
pub fn kill_9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The backends of coord processes in `db` whose command is `command`.
async fn backends_of(client: &Client, command: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE $1",
            &[&format!("coord {command}@%")],
        )
        .await
        .unwrap()
        .get(0)
}

/// A database with `public.knob` (the handlers' delay) at `delay` seconds
/// and `events` deposits.
async fn ledger_db(delay: f64, events: i32) -> (TestDb, Client) {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE public.knob (delay float8 NOT NULL); INSERT INTO public.knob VALUES ({delay})"
        ))
        .await
        .unwrap();
    deposits(&client, events).await;
    (db, client)
}

/// Waits until a coord `command` of `db` runs a statement that starts with
/// `statement` (a batch's).
async fn until_running(client: &Client, command: &str, statement: &str) {
    eventually(DOES_NOT_HANG, "coord to run a batch", || async move {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE $1 AND state = 'active' AND query LIKE $2",
                &[&format!("coord {command}@%"), &format!("{statement}%")],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
}

/// Item 4: a batch statement that would run for about 100 s ends within
/// seconds of its process being killed (the server checks the client during
/// the statement), and the re-run completes exactly.
#[tokio::test]
async fn a_killed_replays_batch_ends_within_seconds_and_the_rerun_is_exact() {
    let (db, mut client) = ledger_db(0.05, 2000).await;
    db.write_config("coord.toml", &ledger_batch_toml("1.0.0"));
    let mut replay = db.spawn_coord(&["replay", "--batch-size", "2000"]);
    until_running(&client, "replay", "WITH batch_events").await;
    kill_9(&mut replay);
    let killed = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the killed replay's backends to end (its batch would run for about 100 s)",
        || {
            let client = &client;
            async move { backends_of(client, "replay").await == 0 }
        },
    )
    .await;
    eprintln!("orphaned batch ended {:?} after the kill", killed.elapsed());
    client
        .batch_execute("UPDATE public.knob SET delay = 0")
        .await
        .unwrap();
    let out = db.coord(&["replay"]);
    assert_exit(&out, 0);
    assert_eq!(
        differences(&mut client, &schema("1.0.0")).await,
        Vec::<String>::new()
    );
}

/// Item 4's regression test: kill -9 of `coord replay` and of `coord
/// activate-current-config` with config-SQL projectors mid-batch, then an
/// immediate re-run exits 0 with an exact result; 10 times in a row.
#[tokio::test]
async fn kill_9_mid_batch_then_an_immediate_rerun_is_exact_ten_times_in_a_row() {
    let (db, mut client) = ledger_db(0.001, 600).await;
    for i in 0..10 {
        let version = format!("1.0.{i}");
        let file = format!("v{i}.toml");
        db.write_config(&file, &ledger_toml(&version, true));
        let command = if i % 2 == 0 {
            "replay"
        } else {
            "activate-current-config"
        };
        let mut run = db.spawn_coord(&[command, "--config", &file, "--batch-size", "40"]);
        until_running(&client, command, "INSERT INTO totals").await;
        kill_9(&mut run);
        let out = db.coord(&[command, "--config", &file, "--batch-size", "40"]);
        assert_exit(&out, 0);
        if command == "replay" {
            // Activate it too, so that the next version replays behind an
            // active one and publishers' SQL handlers run.
            assert_exit(
                &db.coord(&["activate-current-config", "--config", &file]),
                0,
            );
        }
        assert_eq!(
            differences(&mut client, &schema(&version)).await,
            Vec::<String>::new(),
            "round {i} ({command})"
        );
        // More events between rounds, applied inline by the active version.
        client
            .execute(
                &format!(
                    "SELECT coord.publish('{{\"ledger\": \"{version}\"}}'::jsonb, 'acc-' || (i % 7), NULL, \
                     jsonb_build_array(jsonb_build_object('type', 'Deposited', 'data', \
                     jsonb_build_object('amount', i)))) FROM generate_series(1, 30) i"
                ),
                &[],
            )
            .await
            .unwrap();
    }
}

/// A process id that no longer runs: a child's, reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// The kernel's host name, as coord names its connections with.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// Item 4: a backend that holds the activation lock for a coord process of
/// this host that no longer runs (as after a kill -9 whose connection the
/// server has not noticed yet) is ended, named, and the run proceeds.
#[tokio::test]
async fn an_activation_lock_held_for_a_dead_process_is_taken_over_naming_it() {
    let (db, mut client) = ledger_db(0.0, 100).await;
    db.write_config("coord.toml", &ledger_toml("1.0.0", false));
    let name = format!(
        "coord activate-current-config@{} pid {}",
        host_name(),
        dead_pid()
    );
    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.application_name(&name);
    let (orphan, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    orphan
        .batch_execute("SELECT pg_advisory_lock(1668247413, 0)")
        .await
        .unwrap();
    let out = db.coord(&["activate-current-config"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
    assert!(stderr(&out).contains("no longer runs"), "{}", stderr(&out));
    assert!(
        connection.await.unwrap().is_err(),
        "the orphan was terminated"
    );
    drop(orphan);
    assert_eq!(
        differences(&mut client, &schema("1.0.0")).await,
        Vec::<String>::new()
    );

    // A live holder is never touched: the run waits and gives up (exit 7).
    let live = format!("coord rebuild@{} pid {}", host_name(), std::process::id());
    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.application_name(&live);
    let (holder, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("SELECT pg_advisory_lock(1668247413, 0)")
        .await
        .unwrap();
    db.write_config("v2.toml", &ledger_toml("2.0.0", false));
    let out = db.coord(&["activate-current-config", "--config", "v2.toml"]);
    assert_exit(&out, 7);
    assert!(stderr(&out).contains(&live), "{}", stderr(&out));
    assert!(!holder.is_closed());
}

/// Item 4: coord's connections, single and pooled, carry its host and pid,
/// and the server checks their client during statements and probes idle
/// links.
#[tokio::test]
async fn connections_are_named_and_watched() {
    let (db, _client) = ledger_db(0.0, 1).await;
    db.write_config("coord.toml", &ledger_toml("1.0.0", false));
    let query =
        "SELECT application_name || ' ' || current_setting('client_connection_check_interval') \
                 || ' ' || current_setting('tcp_keepalives_idle') FROM pg_stat_activity \
                 WHERE pid = pg_backend_pid()";
    // (The command line's names, `coord replay@host pid N`, are what the
    // tests above find its batches by.)
    let url = db.database_url();
    let client = coord::connect(&url, Duration::from_secs(5)).await.unwrap();
    let seen: String = client.query_one(query, &[]).await.unwrap().get(0);
    let expected_tail = format!(" pid {} 2s 10", std::process::id());
    assert!(seen.starts_with("coord") && seen.contains('@'), "{seen}");
    assert!(seen.ends_with(&expected_tail), "{seen}");
    let pool = coord::pool(&url, 1).unwrap();
    let pooled = pool.get().await.unwrap();
    let seen: String = pooled.query_one(query, &[]).await.unwrap().get(0);
    assert!(seen.ends_with(&expected_tail), "{seen}");
}

/// Item 7: `coord wait --timeout 1` returns within about a second even when
/// each connection attempt may take 20 s (connecting counts against it).
#[tokio::test]
async fn wait_is_bounded_by_its_timeout_against_a_silent_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let db = TestDb::new().await;
    db.write_config("coord.toml", &ledger_toml("1.0.0", false));
    let url = format!("postgres://u@127.0.0.1:{port}/x");
    let started = Instant::now();
    let out = run_coord(
        db.dir.path(),
        &[],
        &[
            "wait",
            "--timeout",
            "1",
            "--connect-timeout",
            "20",
            "--database-url",
            &url,
        ],
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
    drop(listener);
}

/// Item 7: `--data @PATH` and `--data -` carry payloads beyond the argument
/// limit; a missing file or bad JSON is refused naming it, writing nothing.
#[tokio::test]
async fn publish_reads_large_payloads_from_a_file_or_standard_input() {
    let (db, client) = ledger_db(0.0, 0).await;
    db.write_config("coord.toml", &ledger_toml("1.0.0", false));
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    let big = serde_json::json!({ "amount": 1, "note": "x".repeat(300_000) }).to_string();
    let path = db.write_config("payload.json", &big);
    let args = ["publish", "--stream", "s", "--type", "Noted", "--data"];
    let from_file = format!("@{}", path.display());
    let out = db.coord(&[&args[..], &[from_file.as_str()]].concat());
    assert_exit(&out, 0);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_coord"))
        .current_dir(db.dir.path())
        .args(args)
        .arg("-")
        .env("DATABASE_URL", &db.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn({
        let big = big.clone();
        move || std::io::Write::write_all(&mut stdin, big.as_bytes())
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "2", "the second event of the store");
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM coord.events WHERE data = $1::text::jsonb",
            &[&big],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 2);

    let before = db.snapshot().await;
    let bad = db.write_config("bad.json", "{\"amount\": ");
    for (data, named) in [
        (
            "@/nonexistent/payload.json".to_owned(),
            "/nonexistent/payload.json",
        ),
        (format!("@{}", bad.display()), "bad.json"),
    ] {
        let out = db.coord(&[&args[..], &[data.as_str()]].concat());
        assert_exit(&out, 2);
        assert!(stderr(&out).contains(named), "{}", stderr(&out));
        assert!(stderr(&out).contains("--data"), "{}", stderr(&out));
    }
    assert_eq!(db.snapshot().await, before);
}
