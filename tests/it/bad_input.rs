//! Bad input changes nothing (invariant 7): transaction control and extra
//! statements refused at configuration load, the event store relation
//! validated before anything is written, registration in one transaction,
//! a newer `coord` schema refused by every writing command, one rule for
//! event types. "Nothing changed" compares digests of the rows.

use std::sync::Arc;

use coord::activation::{self, ActivateOptions};
use coord::Actor;
use coord::{Config, Error, ExpectedVersion, NewEvent, ProjectorSet, Publisher, RelationName};

use crate::contents::{digest, refused_and_unchanged};
use crate::support::{assert_exit, balances_toml, stderr, TestDb};

fn actor() -> Actor {
    Actor::new("test-host", "test")
}

fn problems(text: &str) -> String {
    Config::parse(text, "coord.toml").unwrap_err().to_string()
}

async fn import_events(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acc-' || a, 1, 'AccountOpened', '{}' FROM generate_series(1, 50) a",
        )
        .await
        .unwrap();
}

/// `activate_current_config` through the library fails with
/// [`Error::InvalidInput`] (exit code 2) whose message holds `needle`.
async fn invalid_activation(
    pool: &deadpool_postgres::Pool,
    db: &TestDb,
    projectors: &ProjectorSet,
    event_store: &RelationName,
    needle: &str,
) {
    let err = activation::activate_current_config(
        pool,
        &db.database_url(),
        projectors,
        event_store,
        &ActivateOptions::default(),
        &actor(),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains(needle)),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}

#[tokio::test]
async fn transaction_control_and_extra_statements_are_refused_at_config_load() {
    let good = balances_toml("1.0.0");
    let table =
        "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);";
    let opened = "AccountOpened  = \"INSERT INTO balances (account) VALUES ($1)\"";
    let cases = [
        (
            good.replace(table, &format!("{table}\nCOMMIT;\nCREATE TABLE extra (x int);")),
            "field `tables`: the DDL statement 2 is transaction control (COMMIT)",
        ),
        (
            good.replace(table, &format!("BEGIN; {table} END;")),
            "field `tables`: the DDL statement 1 is transaction control (BEGIN)",
        ),
        (
            good.replace(opened, "AccountOpened = \"COMMIT\""),
            "field `handlers.AccountOpened`: the SQL is transaction control (COMMIT)",
        ),
        (
            good.replace(
                opened,
                "AccountOpened = \"INSERT INTO balances (account) VALUES ($1); DELETE FROM balances\"",
            ),
            "field `handlers.AccountOpened`: the SQL holds 2 statements",
        ),
        (
            good.replace(
                "version = \"1.0.0\"",
                "version = \"1.0.0\"\nverify = [\"SELECT true; COMMIT\"]",
            ),
            "field `verify[0]`: the assertion holds 2 statements",
        ),
        (
            good.replace(
                "version = \"1.0.0\"",
                "version = \"1.0.0\"\nverify = [\"ROLLBACK\"]",
            ),
            "field `verify[0]`: the assertion is transaction control (ROLLBACK)",
        ),
    ];
    let db = TestDb::migrated().await;
    import_events(&db).await;
    for (text, needle) in &cases {
        assert_ne!(text, &good, "{needle}");
        let message = problems(text);
        assert!(message.contains(needle), "{message}");
        db.write_config("bad.toml", text);
        for command in ["activate-current-config", "replay", "plan"] {
            refused_and_unchanged(&db, &[command, "--config", "bad.toml"], needle).await;
        }
    }
}

#[tokio::test]
async fn a_missing_or_incomplete_event_store_relation_changes_nothing() {
    let db = TestDb::migrated().await;
    import_events(&db).await;
    let text = format!(
        "[event_store]\nrelation = \"public.my_events\"\n{}",
        balances_toml("1.0.0")
    );
    db.write_config("coord.toml", &text);
    let config = Config::parse(&text, "coord.toml").unwrap();
    let projectors = ProjectorSet::from_config(&config);
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let client = db.client().await;

    let missing = "field `event_store.relation`: public.my_events does not exist";
    for command in [
        "activate-current-config",
        "replay",
        "catch-up",
        "status",
        "plan",
    ] {
        refused_and_unchanged(&db, &[command], missing).await;
    }

    client
        .batch_execute(
            "CREATE VIEW public.my_events AS \
             SELECT position, stream_id, stream_version::int AS stream_version, event_type, data \
             FROM coord.events",
        )
        .await
        .unwrap();
    let lacking =
        "public.my_events lacks column xact_id (xid8), has column stream_version of type \
                   integer, not bigint, lacks column metadata (jsonb), lacks column recorded_at";
    for command in ["activate-current-config", "replay", "catch-up"] {
        refused_and_unchanged(&db, &[command], lacking).await;
    }

    // The library refuses the same way, before writing.
    let before = digest(&db).await;
    invalid_activation(&pool, &db, &projectors, &config.event_store, lacking).await;
    let all: Vec<_> = projectors.iter().cloned().collect();
    let outcomes = coord::replay_many(
        &pool,
        &all,
        &config.event_store,
        &Default::default(),
        &actor(),
        &Default::default(),
    )
    .await;
    assert!(
        matches!(&outcomes[0].result, Err(Error::InvalidInput(m)) if m.contains(lacking)),
        "{:?}",
        outcomes[0].result
    );
    assert_eq!(before, digest(&db).await);

    // With every column, the same configuration activates.
    client
        .batch_execute(
            "CREATE OR REPLACE VIEW public.my_events_full AS SELECT * FROM coord.events; \
             DROP VIEW public.my_events; ALTER VIEW public.my_events_full RENAME TO my_events",
        )
        .await
        .unwrap();
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    let count: i64 = client
        .query_one("SELECT count(*) FROM balances_v1_0_0.balances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 50);
}

#[tokio::test]
async fn registration_is_one_transaction_and_a_failure_leaves_no_trace() {
    let db = TestDb::migrated().await;
    let table =
        "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);";
    // The second statement fails after the row, the schema and the first
    // table were written in the registration's transaction.
    let failing =
        balances_toml("1.0.0").replace(table, &format!("{table}\nCREATE TABLE balances (x int);"));
    db.write_config("failing.toml", &failing);
    refused_and_unchanged(
        &db,
        &["activate-current-config", "--config", "failing.toml"],
        "the tables of projector balances@1.0.0 cannot be created",
    )
    .await;
    let before = digest(&db).await;
    let set = ProjectorSet::from_config(&Config::parse(&failing, "failing.toml").unwrap());
    let mut client = db.client().await;
    let err = coord::start_replay(&mut client, set.get("balances").unwrap().as_ref(), &actor())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(before, digest(&db).await);

    // A successful registration writes the version row, the state, the
    // transition, the schema and its tables in one transaction.
    let set =
        ProjectorSet::from_config(&Config::parse(&balances_toml("1.0.0"), "coord.toml").unwrap());
    let projector: Arc<dyn coord::Projector> = set.get("balances").unwrap().clone();
    coord::start_replay(&mut client, projector.as_ref(), &actor())
        .await
        .unwrap();
    let xids: Vec<String> = client
        .query_one(
            "SELECT ARRAY[
                 (SELECT xmin::text FROM coord.projector_versions WHERE name = 'balances'),
                 (SELECT xmin::text FROM coord.projector_states WHERE name = 'balances'),
                 (SELECT xmin::text FROM coord.transitions WHERE name = 'balances' AND to_status = 'replaying'),
                 (SELECT xmin::text FROM pg_namespace WHERE nspname = 'balances_v1_0_0'),
                 (SELECT xmin::text FROM pg_class WHERE oid = 'balances_v1_0_0.balances'::regclass)]",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(xids.len(), 5);
    assert!(xids.iter().all(|x| x == &xids[0]), "{xids:?}");
}

#[tokio::test]
async fn a_newer_coord_schema_refuses_every_writing_command_and_warns_readers() {
    let db = TestDb::migrated().await;
    import_events(&db).await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    db.write_config(
        "async.toml",
        &balances_toml("2.0.0").replace(
            "version = \"2.0.0\"",
            "version = \"2.0.0\"\nmode = \"async\"",
        ),
    );
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO coord.schema_history (version, name, applied_on, checksum) \
             VALUES (9999, 'from_the_future', now()::text, '0')",
        )
        .await
        .unwrap();
    let both = format!(
        "at V9999, newer than this coord {} knows (up to V{})",
        env!("CARGO_PKG_VERSION"),
        coord::known_schema_version()
    );
    let writers: [&[&str]; 12] = [
        &["migrate"],
        &[
            "publish",
            "--stream",
            "acc-1",
            "--type",
            "MoneyDeposited",
            "--data",
            r#"{"amount": 1}"#,
        ],
        &["replay"],
        &["catch-up"],
        &["abort"],
        &["abort", "--projector", "balances"],
        &["prune", "--yes"],
        &["activate-current-config"],
        &["activate-current-config", "--config", "async.toml"],
        &["rollback", "balances"],
        &["rebuild", "balances"],
        &["run", "--config", "async.toml"],
    ];
    for args in writers {
        refused_and_unchanged(&db, args, &both).await;
    }
    for args in [&["status"][..], &["plan"], &["check"]] {
        let out = db.coord(args);
        assert_exit(&out, 0);
        assert!(
            stderr(&out).contains("(V9999) is newer than this coord"),
            "{args:?}: {}",
            stderr(&out)
        );
    }

    let mut client = db.client().await;
    let err = coord::ensure_writable(&client).await.unwrap_err();
    assert!(
        matches!(&err, Error::SchemaTooNew { database: 9999, .. }),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    let err = coord::migrate(&mut client).await.unwrap_err();
    assert!(err.to_string().contains(&both), "{err}");
}

#[tokio::test]
async fn event_types_and_handler_keys_follow_one_rule() {
    for key in ["\" lead\"", "\"lead \"", "\" \"", "\"a\\tb\""] {
        let text = balances_toml("1.0.0").replace(
            "AccountOpened  =",
            &format!("{key} = \"DELETE FROM balances\"\nAccountOpened  ="),
        );
        let message = problems(&text);
        assert!(
            message.contains("field `handlers`: invalid event type"),
            "{key}: {message}"
        );
    }

    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    for event_type in [" lead", "lead ", " ", ""] {
        refused_and_unchanged(
            &db,
            &[
                "publish", "--stream", "s", "--type", event_type, "--data", "{}",
            ],
            "--type: invalid event type",
        )
        .await;
    }

    let before = digest(&db).await;
    let set =
        ProjectorSet::from_config(&Config::parse(&balances_toml("1.0.0"), "coord.toml").unwrap());
    let publisher = Publisher::new(set);
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let err = publisher
        .publish(
            &tx,
            "s",
            ExpectedVersion::Any,
            &[NewEvent::new(" lead", serde_json::json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains("invalid event type")),
        "{err}"
    );
    drop(tx);
    assert_eq!(before, digest(&db).await);
    let _ = RelationName::default();
}

/// A Rust projector whose definition only differs from a good one by what
/// the test gives it.
struct RustProjector {
    name: coord::ProjectorName,
    version: semver::Version,
    tables: &'static str,
    event_types: Vec<String>,
}

#[async_trait::async_trait]
impl coord::Projector for RustProjector {
    fn name(&self) -> &coord::ProjectorName {
        &self.name
    }
    fn version(&self) -> &semver::Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        self.event_types.clone()
    }
    fn tables(&self) -> &str {
        self.tables
    }
    async fn apply(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        _events: &[coord::Event],
        _ctx: &coord::ApplyContext,
    ) -> Result<(), coord::HandlerError> {
        Ok(())
    }
}

/// Rust projectors have no configuration load: their definition is checked
/// when they are registered, before anything is written.
#[tokio::test]
async fn a_rust_projector_with_transaction_control_or_a_bad_event_type_changes_nothing() {
    let db = TestDb::migrated().await;
    import_events(&db).await;
    let good = || RustProjector {
        name: coord::ProjectorName::new("rusty").unwrap(),
        version: semver::Version::new(1, 0, 0),
        tables: "CREATE TABLE t (x int);",
        event_types: vec!["AccountOpened".into()],
    };
    let cases = [
        (
            RustProjector {
                tables: "CREATE TABLE t (x int); COMMIT; CREATE TABLE u (y int);",
                ..good()
            },
            "projector rusty@1.0.0: the tables DDL statement 2 is transaction control (COMMIT)",
        ),
        (
            RustProjector {
                event_types: vec![" AccountOpened".into()],
                ..good()
            },
            "projector rusty@1.0.0: invalid event type \" AccountOpened\"",
        ),
    ];
    let before = digest(&db).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let mut client = db.client().await;
    for (projector, needle) in cases {
        let err = coord::start_replay(&mut client, &projector, &actor())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains(needle)),
            "{err}"
        );
        let set = ProjectorSet::new(vec![Arc::new(projector)]).unwrap();
        invalid_activation(&pool, &db, &set, &RelationName::default(), needle).await;
        assert_eq!(before, digest(&db).await, "{needle}");
    }
    coord::start_replay(&mut client, &good(), &actor())
        .await
        .unwrap();
}
