//! `Projector::replay_reads_metadata`: a projector that reads only the
//! events' `data` gets `metadata` as `null` in replays (decision 0081),
//! and the payload as stored otherwise.

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
    seen: Mutex<Vec<(Value, Value)>>,
}

impl Recorder {
    fn new(name: &str, reads_metadata: bool) -> Self {
        Self {
            name: ProjectorName::new(name).unwrap(),
            version: Version::new(1, 0, 0),
            reads_metadata,
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
