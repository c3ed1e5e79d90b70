//! A tiny application crate that embeds the `coord` command line with a Rust
//! projector (`coord::cli::run`), driven through its own binary exactly as a
//! deploy pipeline drives `coord`: activation, status, the gate's check and
//! rollback, with exit codes and output asserted.
//!
//! This test target is both: run with `COORD_APP_VERSION` set, it *is* the
//! application (`fn main` hands its command line to `coord::cli::run`);
//! without, it is the test, which runs itself as the application.

use std::process::{Command, ExitCode, Output};
use std::sync::Arc;

use async_trait::async_trait;
use coord::{ApplyContext, Event, HandlerError, Projector, ProjectorName, ProjectorSet};
use semver::Version;

#[path = "it/support/mod.rs"]
mod support;
// The support module's snapshots use it.
#[allow(dead_code)]
#[path = "it/contents.rs"]
mod contents;

use support::{assert_exit, stderr, stdout, TestDb};

/// `tally@1.0.0` counts events per stream; `tally@2.0.0` also sums `amount`.
struct Tally {
    name: ProjectorName,
    version: Version,
}

#[async_trait]
impl Projector for Tally {
    fn name(&self) -> &ProjectorName {
        &self.name
    }

    fn version(&self) -> &Version {
        &self.version
    }

    fn event_types(&self) -> Vec<String> {
        vec!["Deposited".to_owned()]
    }

    fn tables(&self) -> &str {
        if self.version.major == 1 {
            "CREATE TABLE tally (stream text PRIMARY KEY, n bigint NOT NULL);"
        } else {
            "CREATE TABLE tally (stream text PRIMARY KEY, n bigint NOT NULL, total bigint NOT NULL);"
        }
    }

    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
        _ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        for e in events {
            let amount = e.data.get("amount").and_then(|a| a.as_i64()).unwrap_or(0);
            if self.version.major == 1 {
                tx.execute(
                    "INSERT INTO tally VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = tally.n + 1",
                    &[&e.stream_id],
                )
                .await?;
            } else {
                tx.execute(
                    "INSERT INTO tally VALUES ($1, 1, $2) ON CONFLICT (stream) \
                     DO UPDATE SET n = tally.n + 1, total = tally.total + $2",
                    &[&e.stream_id, &amount],
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// The application: its Rust projectors for the version it runs.
fn application(version: u64) -> ExitCode {
    let tally: Arc<dyn Projector> = Arc::new(Tally {
        name: ProjectorName::new("tally").expect("valid name"),
        version: Version::new(version, 0, 0),
    });
    coord::cli::run(ProjectorSet::new(vec![tally]).expect("one projector"))
}

/// A config-defined projector both application versions share.
const COORD_TOML: &str = r#"
[[projector]]
name = "audit"
version = "1.0.0"
tables = "CREATE TABLE audit (position bigint PRIMARY KEY);"
[projector.handlers]
Deposited = "INSERT INTO audit VALUES ($3)"
"#;

fn app(db: &TestDb, version: u64, args: &[&str]) -> Output {
    Command::new(std::env::current_exe().expect("own path"))
        .current_dir(db.dir.path())
        .args(args)
        .env("COORD_APP_VERSION", version.to_string())
        .env("DATABASE_URL", &db.url)
        .env_remove("COORD_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the application")
}

fn deposit(db: &TestDb, version: u64, stream: &str, amount: i64) {
    let data = format!(r#"{{"amount": {amount}}}"#);
    let out = app(
        db,
        version,
        &[
            "publish",
            "--stream",
            stream,
            "--type",
            "Deposited",
            "--data",
            &data,
        ],
    );
    assert_exit(&out, 0);
}

async fn scenario() {
    let db = TestDb::new().await;
    db.write_config("coord.toml", COORD_TOML);

    assert_exit(&app(&db, 1, &["migrate"]), 0);
    deposit(&db, 1, "a", 5);
    deposit(&db, 1, "b", 7);

    // v1 goes live: the Rust projector and the coord.toml one together.
    let out = app(&db, 1, &["activate-current-config"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("tally"), "{}", stdout(&out));
    assert!(stdout(&out).contains("audit"), "{}", stdout(&out));
    assert_exit(&app(&db, 1, &["check"]), 0);
    let out = app(&db, 2, &["check"]);
    assert_exit(&out, 4);
    assert!(stderr(&out).contains("not yet active"), "{}", stderr(&out));

    // Publishing through the application's binary runs its Rust projector inline.
    deposit(&db, 1, "a", 3);
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT sum(n)::int8 FROM tally_v1_0_0.tally", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "v1's tally applies every event once");

    // v2 is deployed with its own binary; v1 is then refused.
    assert_exit(&app(&db, 2, &["activate-current-config"]), 0);
    let out = app(&db, 1, &["check", "--output", "json"]);
    assert_exit(&out, 3);
    let refusal: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(refusal["sqlstate"], "CO001", "{refusal}");
    assert!(
        stderr(&out).contains("tally 1.0.0 is stale"),
        "{}",
        stderr(&out)
    );
    let total: i64 = client
        .query_one("SELECT sum(total)::int8 FROM tally_v2_0_0.tally", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 15, "v2 was replayed from every event");

    let out = app(&db, 2, &["status", "--output", "json"]);
    assert_exit(&out, 0);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let active = |name: &str| {
        status["projectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["active_version"].clone())
    };
    assert_eq!(active("tally"), Some("2.0.0".into()), "{status}");
    assert_eq!(active("audit"), Some("1.0.0".into()), "{status}");

    // Rolling back with v1's binary makes v1 the one that may publish again.
    let out = app(&db, 1, &["rollback", "tally"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("tally"), "{}", stdout(&out));
    assert_exit(&app(&db, 1, &["check"]), 0);
    assert_exit(&app(&db, 2, &["check"]), 4);

    // A projector defined both in coord.toml and in Rust is refused, naming both.
    db.write_config(
        "clash.toml",
        &COORD_TOML.replace("name = \"audit\"", "name = \"tally\""),
    );
    let out = app(&db, 1, &["plan", "--config", "clash.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("tally") && stderr(&out).contains("Rust"),
        "{}",
        stderr(&out)
    );

    // The plain `coord` binary sees only coord.toml's projector: it would
    // retire the application's.
    let out = db.coord(&["plan"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("retire 1.0.0 (no longer configured)"),
        "{}",
        stdout(&out)
    );
}

fn main() -> ExitCode {
    if let Ok(version) = std::env::var("COORD_APP_VERSION") {
        return application(version.parse().expect("COORD_APP_VERSION is a number"));
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(scenario());
    println!("test embedded_cli::scenario ... ok");
    println!("1 passed, 0 failed");
    ExitCode::SUCCESS
}
