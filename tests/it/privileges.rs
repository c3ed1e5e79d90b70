//! `[privileges]` (issue 13): coord runs as the owner, the application as a
//! login role that owns nothing. With the runbook's GRANT list on the
//! `coord` schema and `[privileges] write = [role]`, the application
//! publishes inline (Rust publisher, `coord.check_publish` + INSERT,
//! `coord.publish`) and reads the active version's tables through the
//! activation of a new version, a rollback and a rebuild. Bad and unknown role names
//! are refused before anything is written.

use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use crate::support::{admin_execute_from_drop, admin_url, assert_exit, connect, stderr, TestDb};

/// The runbook's minimal GRANT list on the `coord` schema for a role that
/// publishes (docs/runbook.md, "Application roles"); `{role}` is replaced.
const COORD_GRANTS: &str = "
GRANT USAGE ON SCHEMA coord TO {role};
GRANT SELECT ON coord.projector_states, coord.projector_versions TO {role};
GRANT SELECT, INSERT ON coord.events, coord.applied_ahead TO {role};
";

/// A login role that owns nothing, dropped (after the test's database,
/// which holds its privileges: declare it first) when this value is dropped.
struct AppRole {
    name: String,
}

impl AppRole {
    async fn new() -> Self {
        let name = format!("coord_app_{}_{}", std::process::id(), rand::random::<u32>());
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .await
            .expect("create role");
        Self { name }
    }

    /// A connection to `db` as this role.
    async fn connect(&self, db: &TestDb) -> Client {
        let mut config: tokio_postgres::Config = db.url.parse().unwrap();
        config.user(&self.name);
        let (client, connection) = config.connect(NoTls).await.expect("connect as app role");
        tokio::spawn(connection);
        client
    }
}

impl Drop for AppRole {
    fn drop(&mut self) {
        admin_execute_from_drop(format!("DROP ROLE IF EXISTS {}", self.name));
    }
}

fn ledger_toml(version: &str, privileges: &str) -> String {
    format!(
        r#"
{privileges}

[[projector]]
name = "ledger"
version = "{version}"
tables = """
CREATE TABLE totals (stream_id text PRIMARY KEY, amount bigint NOT NULL);
CREATE TABLE log (seq bigserial PRIMARY KEY, stream_id text NOT NULL);
"""

[projector.handlers]
Deposited = "WITH l AS (INSERT INTO log (stream_id) VALUES ($1)) INSERT INTO totals VALUES ($1, ($5->>'amount')::bigint) ON CONFLICT (stream_id) DO UPDATE SET amount = totals.amount + excluded.amount"
"#
    )
}

/// Publishes one `Deposited` of `amount` on `stream` through each of the
/// three inline paths, as configuration `ledger@version`.
async fn publish_all_ways(
    app: &mut Client,
    version: &str,
    stream: &str,
    amount: i64,
) -> Result<(), String> {
    let config = Config::parse(&ledger_toml(version, ""), "coord.toml").unwrap();
    let publisher = Publisher::new(ProjectorSet::from_config(&config));
    let tx = app.transaction().await.map_err(|e| e.to_string())?;
    publisher
        .publish(
            &tx,
            stream,
            ExpectedVersion::Any,
            &[NewEvent::new("Deposited", json!({ "amount": amount }))],
        )
        .await
        .map_err(|e| format!("Rust publisher: {e}"))?;
    tx.commit().await.map_err(|e| e.to_string())?;

    let tx = app.transaction().await.map_err(|e| e.to_string())?;
    tx.execute(
        "SELECT coord.publish(jsonb_build_object('ledger', $1::text), $2, NULL, \
         jsonb_build_array(jsonb_build_object('type', 'Deposited', 'data', jsonb_build_object('amount', $3::bigint))))",
        &[&version, &stream, &amount],
    )
    .await
    .map_err(|e| format!("coord.publish: {e:?}"))?;
    tx.commit().await.map_err(|e| e.to_string())?;

    let tx = app.transaction().await.map_err(|e| e.to_string())?;
    tx.execute(
        "SELECT coord.check_publish(jsonb_build_object('ledger', $1::text), ARRAY['Deposited'])",
        &[&version],
    )
    .await
    .map_err(|e| format!("coord.check_publish: {e:?}"))?;
    tx.execute(
        "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
         SELECT $1, (SELECT coalesce(max(stream_version), 0) FROM coord.events WHERE stream_id = $1) + 1, \
         'Deposited', jsonb_build_object('amount', $2::bigint)",
        &[&stream, &amount],
    )
    .await
    .map_err(|e| format!("check_publish + INSERT: {e:?}"))?;
    tx.commit().await.map_err(|e| e.to_string())
}

/// The application's read of the active version's table.
async fn total(app: &Client, schema: &str, stream: &str) -> Result<i64, String> {
    app.query_opt(
        &format!("SELECT amount FROM \"{schema}\".totals WHERE stream_id = $1"),
        &[&stream],
    )
    .await
    .map(|row| row.map_or(0, |r| r.get(0)))
    .map_err(|e| format!("{e:?}"))
}

/// Publishes `amount` through each inline path as `ledger@version` and
/// checks, reading `schema` as the application, that the two paths that
/// apply inline (the Rust publisher and `coord.publish`) did; the
/// `check_publish` + INSERT event is left to the follower.
async fn publish_and_read(app: &mut Client, version: &str, schema: &str, amount: i64) {
    let before = total(app, schema, "s").await.unwrap();
    publish_all_ways(app, version, "s", amount).await.unwrap();
    assert_eq!(total(app, schema, "s").await.unwrap(), before + 2 * amount);
}

async fn schema_of(db: &TestDb, version: &str) -> String {
    db.client()
        .await
        .query_one(
            "SELECT schema_name FROM coord.projector_versions WHERE name = 'ledger' AND version = $1",
            &[&version],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_application_role_publishes_and_reads_through_activation_and_rollback() {
    let role = AppRole::new().await;
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(&COORD_GRANTS.replace("{role}", &role.name))
        .await
        .expect("runbook grants");
    let privileges = format!("[privileges]\nwrite = [\"{}\"]", role.name);
    db.write_config("v1.toml", &ledger_toml("1.0.0", &privileges));
    db.write_config("v2.toml", &ledger_toml("2.0.0", &privileges));
    db.write_config("v3.toml", &ledger_toml("3.0.0", ""));
    let mut app = role.connect(&db).await;

    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v1.toml"]),
        0,
    );
    let v1 = schema_of(&db, "1.0.0").await;
    publish_and_read(&mut app, "1.0.0", &v1, 1).await;

    // A new version, registered and activated by the owner: the
    // application's next deployment publishes and reads it at once.
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v2.toml"]),
        0,
    );
    let v2 = schema_of(&db, "2.0.0").await;
    publish_and_read(&mut app, "2.0.0", &v2, 10).await;

    // Rollback: the previous version's tables are still the application's.
    assert_exit(&db.coord(&["rollback", "ledger", "--config", "v1.toml"]), 0);
    publish_and_read(&mut app, "1.0.0", &v1, 100).await;

    // A rebuild in place: the shadow schema that replaces the live one was
    // granted when it was registered.
    assert_exit(&db.coord(&["rebuild", "ledger", "--config", "v1.toml"]), 0);
    publish_and_read(&mut app, "1.0.0", &v1, 1000).await;

    // Without `[privileges]`, a new version is the owner's alone: the
    // application cannot read it (the control that shows the grants matter).
    assert_exit(&db.coord(&["replay", "--config", "v3.toml"]), 0);
    let v3 = schema_of(&db, "3.0.0").await;
    let denied = total(&app, &v3, "s").await.unwrap_err();
    assert!(denied.contains("42501"), "{denied}");
}

#[tokio::test]
async fn bad_and_unknown_roles_are_refused_before_anything_is_written() {
    let db = TestDb::migrated().await;
    for (file, privileges, expected) in [
        (
            "bad.toml",
            "[privileges]\nread = [\"app; DROP TABLE x\"]",
            "field `privileges.read`: role name",
        ),
        (
            "public.toml",
            "[privileges]\nwrite = [\"public\"]",
            "field `privileges.write`: role name",
        ),
        (
            "unknown.toml",
            "[privileges]\nwrite = [\"coord_no_such_role_x\"]",
            "[privileges] names roles that do not exist: coord_no_such_role_x",
        ),
    ] {
        db.write_config(file, &ledger_toml("1.0.0", privileges));
        let before = db.snapshot().await;
        let out = db.coord(&["activate-current-config", "--config", file]);
        assert_exit(&out, 2);
        assert!(stderr(&out).contains(expected), "{file}: {}", stderr(&out));
        assert_eq!(db.snapshot().await, before, "{file} changed the database");
    }
}
