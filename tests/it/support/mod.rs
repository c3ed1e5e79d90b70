//! Test support: a fresh database per test (dropped afterwards), the built
//! `coord` binary, and config builders.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

mod snapshot;

/// The server tests run against: `DATABASE_URL`, default the local one.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let base = match head[scheme_end..].find('/') {
        Some(slash) => &head[..scheme_end + slash],
        None => head,
    };
    format!("{base}/{db}{query}")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty database, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: tempfile::TempDir,
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to {url}: {e}; is PostgreSQL running? (scripts/test.sh starts it)"
            )
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl TestDb {
    /// A new empty database.
    pub async fn new() -> Self {
        let name = format!(
            "coord_it_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = with_database(&admin_url(), &name);
        Self {
            name,
            url,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A new database with the coord schema migrated.
    pub async fn migrated() -> Self {
        let db = Self::new().await;
        let mut client = db.client().await;
        coord::migrate(&mut client).await.expect("migrate");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub fn database_url(&self) -> coord::DatabaseUrl {
        coord::DatabaseUrl::parse(&self.url).unwrap()
    }

    /// Writes `coord.toml` (or another file) in this test's directory.
    pub fn write_config(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs the built `coord` binary in this test's directory with
    /// `DATABASE_URL` set to this database.
    pub fn coord(&self, args: &[&str]) -> Output {
        run_coord(self.dir.path(), &[("DATABASE_URL", &self.url)], args)
    }

    /// Starts the built `coord` binary in the background in this test's
    /// directory, with `DATABASE_URL` set to this database.
    pub fn spawn_coord(&self, args: &[&str]) -> std::process::Child {
        self.spawn_coord_with_url(&self.url, args)
    }

    /// [`TestDb::spawn_coord`], its connections named `application_name`
    /// (in `pg_stat_activity`), so a test can wait for what they do.
    pub fn spawn_coord_as(&self, application_name: &str, args: &[&str]) -> std::process::Child {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}application_name={application_name}", self.url);
        self.spawn_coord_with_url(&url, args)
    }

    fn spawn_coord_with_url(&self, url: &str, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_coord"))
            .current_dir(self.dir.path())
            .args(args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start coord")
    }

    /// Everything coord could have written: schemas, relations, functions
    /// and a hash of the rows of every table (see `contents::digest`).
    /// Equal before and after a refused command means the command changed
    /// nothing.
    pub async fn snapshot(&self) -> String {
        crate::contents::digest(self).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        admin_execute_from_drop(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `sql` on the admin connection from a `Drop`, ignoring failures.
/// Drop runs inside a test's runtime, which cannot block on itself: use a
/// thread with its own.
pub fn admin_execute_from_drop(sql: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                tokio::spawn(connection);
                let _ = client.batch_execute(&sql).await;
            }
        });
    })
    .join();
}

/// Runs the built `coord` binary.
pub fn run_coord(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coord"));
    command
        .current_dir(dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run coord")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, printing both streams when it differs.
#[track_caller]
pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit {code}\n--- stdout\n{}\n--- stderr\n{}",
        stdout(output),
        stderr(output)
    );
}

/// Polls `check` until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until a backend of `db`'s database named `application_name` has
/// last run a statement containing `statement` (its `pg_stat_activity.query`)
/// and, when `waiting`, waits for a lock now.
pub async fn until_backend(db: &TestDb, application_name: &str, statement: &str, waiting: bool) {
    let client = db.client().await;
    let what = format!("a backend {application_name} running {statement} (waiting: {waiting})");
    eventually(Duration::from_secs(60), &what, || async {
        client
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1 \
                   AND strpos(query, $2) > 0 AND (NOT $3 OR wait_event_type = 'Lock')",
                &[&application_name, &statement, &waiting],
            )
            .await
            .unwrap()
            .get(0)
    })
    .await;
}

/// A config-defined balance projector, as in DESIGN.md.
pub fn balances_toml(version: &str) -> String {
    format!(
        r#"
[[projector]]
name = "balances"
version = "{version}"
tables = """
CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);
"""

[projector.handlers]
AccountOpened  = "INSERT INTO balances (account) VALUES ($1)"
MoneyDeposited = "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1"
MoneyWithdrawn = "UPDATE balances SET amount = amount - ($5->>'amount')::bigint WHERE account = $1"
"#
    )
}
