//! `coord.publish` runs set-based batch handlers (migration V5, decision
//! 0041): on a seeded random store, a batch-handler projector published
//! through the SQL function has the same tables as the per-event one, as
//! the same events published through the Rust `Publisher` and as a replay,
//! with each event applied once.

use coord::replay::ReplayOptions;
use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;
use tokio_postgres::Client;

use crate::batch_handlers::{
    batch_toml, differences, per_event_toml, projector, random_history, replay_with, rows, seeded,
};
use crate::support::{assert_exit, TestDb};

/// `history` cut into publishes of 1 to 8 events of one stream each,
/// keeping every stream's order (each publish takes the earliest remaining
/// events of its stream), so publishes mix types and cross run boundaries.
fn publishes(rng: &mut StdRng, history: &[(String, NewEvent)]) -> Vec<(String, Vec<NewEvent>)> {
    let mut left: Vec<Option<&(String, NewEvent)>> = history.iter().map(Some).collect();
    let mut out = Vec::new();
    let mut first = 0;
    while first < left.len() {
        let Some((stream, _)) = left[first] else {
            first += 1;
            continue;
        };
        let stream = stream.clone();
        let size = rng.gen_range(1..=8);
        let mut events = Vec::new();
        for slot in left.iter_mut().skip(first) {
            if events.len() == size {
                break;
            }
            if let Some((s, e)) = slot {
                if *s == stream {
                    events.push(e.clone());
                    *slot = None;
                }
            }
        }
        out.push((stream, events));
    }
    out
}

fn config_toml() -> String {
    format!(
        "{}\n{}",
        per_event_toml("bank_each"),
        batch_toml("bank_set")
    )
}

/// A fresh database where `toml`'s versions are active.
pub(crate) async fn activated(toml: &str) -> TestDb {
    let db = TestDb::migrated().await;
    let path = db.write_config("coord.toml", toml);
    assert_exit(
        &db.coord(&[
            "activate-current-config",
            "--config",
            path.to_str().unwrap(),
        ]),
        0,
    );
    db
}

/// The rows of `schema`'s tables, as text, in order; without
/// `recorded_at` (`last_at`), which differs between two databases.
async fn dump(client: &Client, schema: &str) -> Vec<String> {
    let sql = format!(
        "SELECT 'balances ' || t::text FROM {schema}.balances t \
         UNION ALL SELECT 'activity ' || row(account, deposits, last_version, last_position, last_by)::text \
         FROM {schema}.activity ORDER BY 1"
    );
    let rows = client.query(&sql, &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn sql_publish_runs_batch_handlers_like_the_rust_publisher_and_a_replay() {
    let (seed, mut rng) = seeded();
    let history = random_history(&mut rng, 12, 700);
    let publishes = publishes(&mut rng, &history);
    let toml = config_toml();

    // Through coord.publish.
    let sql_db = activated(&toml).await;
    let client = sql_db.client().await;
    let versions = json!({"bank_each": "1.0.0", "bank_set": "1.0.0"});
    for (stream, events) in &publishes {
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                json!({"type": e.event_type, "data": e.data,
                       "metadata": e.metadata.clone().unwrap_or_else(|| json!({}))})
            })
            .collect();
        client
            .execute(
                "SELECT coord.publish($1::jsonb, $2, NULL, $3::jsonb)",
                &[&versions, stream, &json!(events)],
            )
            .await
            .unwrap();
    }

    // Applied inline, each event once: one applied_ahead row per event,
    // and a catch-up afterwards applies nothing.
    let inline: i64 = client
        .query_one(
            "SELECT count(*) FROM coord.applied_ahead WHERE name = 'bank_set' AND inline",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inline, 700, "seed {seed}");
    assert!(rows(&client, "bank_set_v1_0_0.activity").await > 0);
    assert_eq!(
        differences(&client, "bank_each_v1_0_0", "bank_set_v1_0_0").await,
        0,
        "coord.publish, batch vs per-event handlers; seed {seed}"
    );
    let set = projector(&batch_toml("bank_set"));
    let report = replay_with(&sql_db, set.as_ref(), ReplayOptions::default()).await;
    assert_eq!(report.applied, 0, "seed {seed}");
    assert_eq!(
        differences(&client, "bank_each_v1_0_0", "bank_set_v1_0_0").await,
        0,
        "seed {seed}"
    );

    // A replay of the same store gives the same tables.
    let replayed = projector(&batch_toml("bank_replay"));
    let report = replay_with(&sql_db, replayed.as_ref(), ReplayOptions::default()).await;
    assert_eq!(report.applied, 700);
    assert_eq!(
        differences(&client, "bank_set_v1_0_0", "bank_replay_v1_0_0").await,
        0,
        "coord.publish vs replay; seed {seed}"
    );

    // The same publishes through the Rust Publisher, in another database:
    // the same positions, so the same rows.
    let rust_db = activated(&toml).await;
    let config = Config::parse(&toml, "coord.toml").unwrap();
    let publisher = Publisher::new(ProjectorSet::from_config(&config));
    let mut rust_client = rust_db.client().await;
    for (stream, events) in &publishes {
        publisher
            .publish_with_retry(
                &mut rust_client,
                stream,
                ExpectedVersion::Any,
                events,
                coord::RetryPolicy::default(),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        dump(&client, "bank_set_v1_0_0").await,
        dump(&rust_client, "bank_set_v1_0_0").await,
        "coord.publish vs the Rust Publisher; seed {seed}"
    );
}

#[tokio::test]
async fn sql_publish_keeps_position_order_between_batch_and_per_event_handlers() {
    // AccountOpened and MoneyDeposited have batch handlers, AccountClosed a
    // per-event one: the closing must run after the opening's statement.
    let db = activated(&batch_toml("bank_set")).await;
    let client = db.client().await;
    let events = json!([
        {"type": "AccountOpened", "data": {}},
        {"type": "MoneyDeposited", "data": {"amount": 5}, "metadata": {"by": "u1"}},
        {"type": "AccountClosed", "data": {}},
        {"type": "MoneyDeposited", "data": {"amount": 7}, "metadata": {"by": "u2"}},
    ]);
    client
        .execute(
            "SELECT coord.publish('{\"bank_set\": \"1.0.0\"}', 'acct-1', 0, $1::jsonb)",
            &[&events],
        )
        .await
        .unwrap();
    assert_eq!(rows(&client, "bank_set_v1_0_0.balances").await, 0);
    assert_eq!(
        dump(&client, "bank_set_v1_0_0").await,
        vec!["activity (acct-1,2,4,4,u2)".to_owned()]
    );
}

#[tokio::test]
async fn a_version_registered_before_v5_is_left_to_the_follower_until_its_definition_is_stored() {
    let db = activated(&config_toml()).await;
    let client = db.client().await;
    // As registered before V5: no stored definition.
    client
        .execute(
            "UPDATE coord.projector_versions SET definition = NULL WHERE name = 'bank_set'",
            &[],
        )
        .await
        .unwrap();
    let versions = json!({"bank_each": "1.0.0", "bank_set": "1.0.0"});
    let publish = |stream: &'static str, events: serde_json::Value| {
        let (client, versions) = (&client, &versions);
        async move {
            client
                .execute(
                    "SELECT coord.publish($1::jsonb, $2, NULL, $3::jsonb)",
                    &[versions, &stream, &events],
                )
                .await
                .unwrap();
        }
    };
    let opened = json!([{"type": "AccountOpened", "data": {}},
                        {"type": "MoneyDeposited", "data": {"amount": 5}, "metadata": {"by": "a"}}]);
    publish("acct-1", opened.clone()).await;
    assert_eq!(rows(&client, "bank_set_v1_0_0.balances").await, 0);

    // A catch-up (which stores the definition again) applies them once.
    let set = projector(&batch_toml("bank_set"));
    let report = replay_with(&db, set.as_ref(), ReplayOptions::default()).await;
    assert_eq!(report.applied, 2);
    let stored: bool = client
        .query_one(
            "SELECT definition ? 'batch_handlers' FROM coord.projector_versions WHERE name = 'bank_set'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored);

    // From then on coord.publish applies them itself.
    publish(
        "acct-1",
        json!([{"type": "MoneyWithdrawn", "data": {"amount": 2}}]),
    )
    .await;
    publish("acct-2", opened).await;
    assert_eq!(rows(&client, "bank_set_v1_0_0.balances").await, 2);
    assert_eq!(
        differences(&client, "bank_each_v1_0_0", "bank_set_v1_0_0").await,
        0
    );
    let report = replay_with(&db, set.as_ref(), ReplayOptions::default()).await;
    assert_eq!(report.applied, 0);
}
