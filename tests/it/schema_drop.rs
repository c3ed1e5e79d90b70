//! coord drops only what it made: prune, abort and rebuild refuse, listing
//! them, when objects outside a version's schema depend on it, unless
//! `--cascade` (library: `Dependents::Cascade`).

use coord::activation::{self, ActivateOptions};
use coord::schema_drop::outside_dependents;
use coord::Actor;
use coord::{Config, Dependents, Error, ProjectorSet};

use crate::contents::{digest, refused_and_unchanged};
use crate::support::{assert_exit, balances_toml, stdout, TestDb};

const REPORT_VIEW: &str =
    "CREATE VIEW public.report AS SELECT account, amount FROM balances_v1_0_0.balances";

fn actor() -> Actor {
    Actor::new("test-host", "test")
}

fn activate(db: &TestDb, version: &str) {
    let file = format!("v{version}.toml");
    db.write_config(&file, &balances_toml(version));
    assert_exit(
        &db.coord(&["activate-current-config", "--config", &file]),
        0,
    );
}

async fn exists(db: &TestDb, regclass: &str) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&regclass])
        .await
        .unwrap()
        .get(0)
}

async fn schema_exists(db: &TestDb, schema: &str) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&schema])
        .await
        .unwrap()
        .get(0)
}

/// What a refusal says: the operation, the schema and the user's view.
fn refusal(operation: &str) -> String {
    format!(
        "{operation} would drop schema balances_v1_0_0 but objects outside it depend on it: \
         view public.report; drop or change them first, or pass --cascade to drop them too"
    )
}

#[track_caller]
fn assert_refused(result: Result<impl std::fmt::Debug, Error>, operation: &str) {
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::Refused(m) if *m == refusal(operation)),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}

#[tokio::test]
async fn prune_refuses_to_drop_a_users_view_unless_cascade() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0");
    activate(&db, "2.0.0");
    db.client().await.batch_execute(REPORT_VIEW).await.unwrap();

    refused_and_unchanged(&db, &["prune", "--yes"], &refusal("coord prune")).await;
    // Without --yes it refuses before asking.
    refused_and_unchanged(&db, &["prune"], &refusal("coord prune")).await;
    // The library refuses the same way.
    let before = digest(&db).await;
    let pool = coord::pool(&db.database_url(), 2).unwrap();
    assert_refused(
        activation::prune(&pool, &actor(), Dependents::Refuse).await,
        "coord prune",
    );
    assert_eq!(before, digest(&db).await);

    let out = db.coord(&["prune", "--yes", "--cascade"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("dropped balances_v1_0_0"),
        "{}",
        stdout(&out)
    );
    assert!(!exists(&db, "public.report").await);
    assert!(!schema_exists(&db, "balances_v1_0_0").await);
    assert!(schema_exists(&db, "balances_v2_0_0").await);
}

#[tokio::test]
async fn a_view_inside_the_pruned_schema_does_not_block_prune() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0");
    activate(&db, "2.0.0");
    // A view inside the schema is the schema's own: no refusal.
    db.client()
        .await
        .batch_execute(
            "CREATE VIEW balances_v1_0_0.inner AS SELECT * FROM balances_v1_0_0.balances",
        )
        .await
        .unwrap();
    let pool = coord::pool(&db.database_url(), 2).unwrap();
    let pruned = activation::prune(&pool, &actor(), Dependents::Refuse)
        .await
        .unwrap();
    assert_eq!(pruned.len(), 1);
    assert!(!schema_exists(&db, "balances_v1_0_0").await);
}

#[tokio::test]
async fn abort_refuses_to_drop_a_users_view_unless_cascade() {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    assert_exit(&db.coord(&["replay"]), 0);
    db.client().await.batch_execute(REPORT_VIEW).await.unwrap();

    let operation = "aborting the replay of balances@1.0.0";
    refused_and_unchanged(
        &db,
        &["abort", "--projector", "balances"],
        &refusal(operation),
    )
    .await;
    let before = digest(&db).await;
    let mut client = db.client().await;
    assert_refused(
        coord::abort(&mut client, "balances", &actor()).await,
        operation,
    );
    assert_eq!(before, digest(&db).await);

    assert_exit(
        &db.coord(&["abort", "--projector", "balances", "--cascade"]),
        0,
    );
    assert!(!exists(&db, "public.report").await);
    assert!(!schema_exists(&db, "balances_v1_0_0").await);
}

#[tokio::test]
async fn rebuild_refuses_up_front_when_a_view_reads_the_live_tables() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0");
    db.client().await.batch_execute(REPORT_VIEW).await.unwrap();

    let operation = "rebuilding balances@1.0.0";
    refused_and_unchanged(
        &db,
        &["rebuild", "balances", "--config", "v1.0.0.toml"],
        &refusal(operation),
    )
    .await;
    let before = digest(&db).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let set =
        ProjectorSet::from_config(&Config::parse(&balances_toml("1.0.0"), "coord.toml").unwrap());
    let result = activation::rebuild(
        &pool,
        &db.database_url(),
        set.get("balances").unwrap(),
        &coord::RelationName::default(),
        &ActivateOptions::default(),
        &actor(),
        &Default::default(),
    )
    .await;
    assert_refused(result, operation);
    assert_eq!(before, digest(&db).await);

    let out = db.coord(&[
        "rebuild",
        "balances",
        "--config",
        "v1.0.0.toml",
        "--cascade",
    ]);
    assert_exit(&out, 0);
    // The view followed the old tables and went with them.
    assert!(!exists(&db, "public.report").await);
    assert!(exists(&db, "balances_v1_0_0.balances").await);
    assert!(!schema_exists(&db, "balances_v1_0_0_old").await);
}

/// Every kind of outside dependent is found, each named as PostgreSQL
/// describes it; what lives inside the schemas is not.
#[tokio::test]
async fn outside_dependents_of_every_kind_are_listed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE SCHEMA s; CREATE SCHEMA t; CREATE SCHEMA elsewhere;
             CREATE TABLE s.a (id int PRIMARY KEY, n int);
             CREATE SEQUENCE s.seq; CREATE TYPE s.mood AS ENUM ('ok');
             CREATE FUNCTION s.f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE VIEW s.inside AS SELECT * FROM s.a;
             CREATE VIEW t.also_dropped AS SELECT * FROM s.a;
             CREATE VIEW elsewhere.v AS SELECT * FROM s.a;
             CREATE MATERIALIZED VIEW elsewhere.mv AS SELECT count(*) FROM s.inside;
             CREATE TABLE elsewhere.fk (a int REFERENCES s.a (id), m s.mood, n bigint DEFAULT nextval('s.seq'));
             CREATE TABLE elsewhere.trig (x int);
             CREATE TRIGGER tr BEFORE INSERT ON elsewhere.trig FOR EACH ROW EXECUTE FUNCTION s.f();",
        )
        .await
        .unwrap();
    let found = outside_dependents(&client, &["s", "t"]).await.unwrap();
    assert_eq!(
        found,
        [
            "materialized view elsewhere.mv",
            "table column elsewhere.fk.m",
            "table constraint fk_a_fkey on elsewhere.fk",
            "table elsewhere.fk",
            "table elsewhere.trig",
            "view elsewhere.v",
        ],
        "{found:?}"
    );
    assert!(outside_dependents(&client, &["elsewhere"])
        .await
        .unwrap()
        .is_empty());
}

/// The dependents are checked under the drop's own locks: a view created by
/// a transaction that was still reading the old tables when prune started
/// is seen (prune waits for that transaction, then refuses) instead of being
/// dropped by a check made too early.
#[tokio::test]
async fn a_view_created_while_prune_waits_for_a_reader_is_not_dropped() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0");
    activate(&db, "2.0.0");
    let mut reader = db.client().await;
    let tx = reader.transaction().await.unwrap();
    tx.query_one("SELECT count(*) FROM balances_v1_0_0.balances", &[])
        .await
        .unwrap();

    let pool = coord::pool(&db.database_url(), 2).unwrap();
    let prune =
        tokio::spawn(async move { activation::prune(&pool, &actor(), Dependents::Refuse).await });
    let observer = db.client().await;
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "prune to wait for the reader's lock",
        || {
            let observer = &observer;
            async move {
                observer
                    .query_one(
                        "SELECT count(*) > 0 FROM pg_locks \
                         WHERE NOT granted AND relation = 'balances_v1_0_0.balances'::regclass",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0)
            }
        },
    )
    .await;
    tx.batch_execute(REPORT_VIEW).await.unwrap();
    tx.commit().await.unwrap();

    assert_refused(prune.await.unwrap(), "coord prune");
    assert!(exists(&db, "public.report").await);
    assert!(schema_exists(&db, "balances_v1_0_0").await);
}
