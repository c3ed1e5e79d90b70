//! `Projector::replay_reads_metadata`: a projector that reads only the
//! events' `data` gets `metadata` as `null` in replays (decision 0081),
//! and the payload as stored otherwise. `Projector::replay_reads_data_keys`:
//! one that names the keys of `data` it reads gets only those there
//! (decision 0093).

use std::sync::Mutex;

use async_trait::async_trait;
use coord::projector::{ApplyContext, Event, HandlerError};
use coord::replay::ReplayOptions;
use coord::{Projector, ProjectorName};
use semver::Version;
use serde_json::{json, Value};
use tokio_postgres::Transaction;

use crate::batch_handlers::replay_with;
use crate::support::TestDb;

/// Records the `data` and `metadata` of every event it is given.
struct Recorder {
    name: ProjectorName,
    version: Version,
    reads_metadata: bool,
    data_keys: Option<Vec<String>>,
    seen: Mutex<Vec<(Value, Value)>>,
}

impl Recorder {
    fn new(name: &str, reads_metadata: bool) -> Self {
        Self {
            name: ProjectorName::new(name).unwrap(),
            version: Version::new(1, 0, 0),
            reads_metadata,
            data_keys: None,
            seen: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Projector for Recorder {
    fn name(&self) -> &ProjectorName {
        &self.name
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        vec!["Noted".into()]
    }
    fn tables(&self) -> &str {
        "CREATE TABLE unused (id int);"
    }
    fn replay_reads_metadata(&self) -> bool {
        self.reads_metadata
    }
    fn replay_reads_data_keys(&self) -> Option<Vec<String>> {
        self.data_keys.clone()
    }
    async fn apply(
        &self,
        _tx: &Transaction<'_>,
        events: &[Event],
        _ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(events.iter().map(|e| (e.data.clone(), e.metadata.clone())));
        Ok(())
    }
}

#[tokio::test]
async fn a_projector_that_reads_no_metadata_gets_the_data_and_null_metadata() {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data, metadata) \
             SELECT 's-' || i, 1, 'Noted', jsonb_build_object('n', i), \
                    jsonb_build_object('trace', repeat('t', 600), 'n', i) \
             FROM generate_series(1, 30) i",
            &[],
        )
        .await
        .unwrap();
    let options = ReplayOptions {
        batch_size: 7,
        ..ReplayOptions::default()
    };
    let without = Recorder::new("without_metadata", false);
    replay_with(&db, &without, options.clone()).await;
    let with = Recorder::new("with_metadata", true);
    replay_with(&db, &with, options).await;

    let without = without.seen.into_inner().unwrap();
    let with = with.seen.into_inner().unwrap();
    assert_eq!(without.len(), 30);
    assert_eq!(with.len(), 30);
    for (i, ((data, metadata), (data_with, metadata_with))) in without.iter().zip(&with).enumerate()
    {
        let n = i as i64 + 1;
        assert_eq!(*data, json!({ "n": n }));
        assert_eq!(*metadata, Value::Null, "event {n}");
        assert_eq!(*data_with, json!({ "n": n }));
        assert_eq!(metadata_with["n"], json!(n));
    }
}

/// Inserts events `from..=to`: `data` an object with `n` and two keys
/// nobody named (one nested), an array for every fifth.
async fn insert_noted(db: &TestDb, from: i64, to: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data, metadata) \
             SELECT 's-' || i, 1, 'Noted', \
                    CASE WHEN i % 5 = 0 THEN jsonb_build_array(i, 'n') \
                    ELSE jsonb_build_object('note', repeat('x', 200), 'n', i, \
                                            'nested', jsonb_build_object('n', -i)) END, \
                    jsonb_build_object('n', i) \
             FROM generate_series($1::bigint, $2::bigint) i",
            &[&from, &to],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_projector_that_names_its_data_keys_gets_only_those_in_replay_and_catch_up() {
    let db = TestDb::migrated().await;
    insert_noted(&db, 1, 30).await;
    let options = ReplayOptions {
        batch_size: 7,
        ..ReplayOptions::default()
    };
    let mut keyed = Recorder::new("keyed", true);
    keyed.data_keys = Some(vec!["n".into(), "absent".into()]);
    replay_with(&db, &keyed, options.clone()).await;
    let whole = Recorder::new("whole", true);
    replay_with(&db, &whole, options.clone()).await;
    // A catch-up pass (after the replay, by the horizon) decodes the same.
    insert_noted(&db, 31, 40).await;
    replay_with(&db, &keyed, options.clone()).await;
    replay_with(&db, &whole, options).await;

    let keyed = keyed.seen.into_inner().unwrap();
    let whole = whole.seen.into_inner().unwrap();
    assert_eq!(keyed.len(), 40);
    assert_eq!(whole.len(), 40);
    for (i, ((data, metadata), (data_whole, metadata_whole))) in
        keyed.iter().zip(&whole).enumerate()
    {
        let n = i as i64 + 1;
        if n % 5 == 0 {
            assert_eq!(*data, json!([n, "n"]), "event {n}: not an object, whole");
        } else {
            assert_eq!(*data, json!({ "n": n }), "event {n}");
            assert_eq!(data_whole["note"], json!("x".repeat(200)), "event {n}");
            assert_eq!(data_whole["nested"], json!({ "n": -n }), "event {n}");
        }
        assert_eq!(data["n"], data_whole["n"]);
        assert_eq!(*metadata, json!({ "n": n }), "metadata whole");
        assert_eq!(metadata, metadata_whole);
    }
}
