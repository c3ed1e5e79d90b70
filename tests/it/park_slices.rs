//! A large batch whose failing statement names no event is first narrowed to
//! slices (decision 0042): only failing slices are bisected, so the events
//! applied again stay near twice the batch, where halving from the whole
//! batch applies it again once per level until the ranges hold one failure.
//! Order is kept: under `park` exactly the failing events are parked, under
//! `fail` the replay stops just before the first one.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use coord::records::{parked_events, version};
use coord::replay::{start_replay, ReplayOptions};
use coord::Actor;
use coord::{Config, SqlProjector};

use crate::batch_handlers::replay_with;
use crate::parking::Counting;
use crate::support::TestDb;

pub(crate) const EVENTS: i64 = 20_000;

fn counting(on_error: &str) -> Counting {
    let toml = format!(
        r#"
[[projector]]
name = "sliced"
version = "1.0.0"
on_error = "{on_error}"
tables = "CREATE TABLE deposits (position bigint PRIMARY KEY, amount bigint NOT NULL);"
[projector.batch_handlers]
MoneyDeposited = "INSERT INTO deposits SELECT position, (data->>'amount')::bigint FROM batch_events"
"#
    );
    let config = Config::parse(&toml, "test").unwrap();
    let on_error = config.projectors[0].on_error;
    Counting::new(
        Arc::new(SqlProjector::new(config.projectors[0].clone())),
        on_error,
    )
}

/// `EVENTS` deposits; one in 1,000 (`i % 1000 = 500`) has no integer
/// amount. Returns the positions of those.
pub(crate) async fn store(db: &TestDb) -> Vec<i64> {
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % 50), i / 50 + 1, 'MoneyDeposited', \
               CASE WHEN i % 1000 = 500 THEN '{\"amount\": \"n/a\"}'::jsonb \
                    ELSE jsonb_build_object('amount', i % 97 + 1) END \
             FROM generate_series(0, $1::bigint - 1) AS i ORDER BY i",
            &[&EVENTS],
        )
        .await
        .unwrap();
    client
        .query(
            "SELECT position FROM coord.events WHERE data->>'amount' = 'n/a' ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Registers `projector` and catches it up in batches of the whole store,
/// returning what the catch-up returned.
pub(crate) async fn replay_one_batch(
    db: &TestDb,
    projector: &dyn coord::Projector,
) -> coord::Result<coord::replay::CatchUpReport> {
    let mut client = db.client().await;
    start_replay(&mut client, projector, &Actor::new("test-host", "test"))
        .await
        .unwrap();
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    coord::replay::catch_up(
        &pool,
        projector,
        &coord::RelationName::default(),
        &ReplayOptions {
            lag_threshold: 1,
            ..one_batch()
        },
        &coord::replay::CancellationToken::new(),
    )
    .await
}

pub(crate) fn one_batch() -> ReplayOptions {
    ReplayOptions {
        batch_size: EVENTS as usize,
        ..ReplayOptions::default()
    }
}

#[tokio::test]
async fn a_large_failing_batch_is_narrowed_to_slices_before_bisecting() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    assert_eq!(bad.len(), 20);
    let projector = counting("park");
    let report = replay_with(&db, &projector, one_batch()).await;
    assert_eq!((report.applied, report.parked), (EVENTS as u64 - 20, 20));
    let parked: Vec<i64> = parked_events(&db.client().await, "sliced", "1.0.0")
        .await
        .unwrap()
        .iter()
        .map(|p| p.position)
        .collect();
    assert_eq!(parked, bad);
    let client = db.client().await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM sliced_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, EVENTS - 20);
    // The whole batch once, the slices once (1x), each failing slice of
    // 512 halved (about 2 x 512 each, 20 of them: 1x): about 3x. Halving
    // from the whole batch applies about 6x (4 levels where every range
    // fails, then about 2x).
    let applied = projector.events.load(Ordering::SeqCst);
    assert!(
        applied <= 4 * EVENTS as usize,
        "{applied} events passed to the projector for a batch of {EVENTS}"
    );
}

#[tokio::test]
async fn slices_keep_order_under_fail() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    let projector = counting("fail");
    let error = replay_one_batch(&db, &projector)
        .await
        .unwrap_err()
        .to_string();
    let client = db.client().await;
    assert!(
        error.contains(&format!("failed at position {}", bad[0])),
        "{error}"
    );
    let v = version(&client, "sliced", "1.0.0").await.unwrap().unwrap();
    let before_first = bad[0] - 1;
    assert_eq!(v.events_processed, before_first);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM sliced_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, before_first);
}

#[tokio::test]
async fn a_failing_slice_is_searched_in_about_one_call_per_halving() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    let projector = counting("park");
    let report = replay_with(&db, &projector, one_batch()).await;
    assert_eq!((report.applied, report.parked), (EVENTS as u64 - 20, 20));
    // 39 slices of 512-513 events, 20 of them with one failing event each.
    // Halving a failing slice tries its first half: when that applies, the
    // second half is known to fail and is halved at once; after the failing
    // event is parked, the rest of the slice is tried as one. So about
    // log2(512) + 2 calls per failing slice (decision 0076), where trying
    // both halves at every level took about 2 log2(512).
    let calls = projector.calls.load(Ordering::SeqCst);
    let slices = EVENTS as usize / 512;
    let per_failing_slice = 12;
    assert!(
        calls <= 1 + slices + bad.len() * per_failing_slice,
        "{calls} calls of the projector for {} failing events",
        bad.len()
    );
}
