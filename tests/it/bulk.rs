//! Bulk writes for Rust projectors: `copy_rows`, and `Phase::Rebuild` only
//! on the first pass of a replay from the start of the store.

use std::sync::Mutex;

use async_trait::async_trait;
use coord::projector::{copy_rows, ApplyContext, Event, HandlerError, Phase};
use coord::replay::ReplayOptions;
use coord::{Projector, ProjectorName};
use semver::Version;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::batch_handlers::replay_with;
use crate::support::TestDb;

/// Copies every event's position and stream into `seen`, recording the
/// phase of each call.
struct Copier {
    name: ProjectorName,
    version: Version,
    phases: Mutex<Vec<Phase>>,
}

#[async_trait]
impl Projector for Copier {
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
        "CREATE TABLE \"seen rows\" (position bigint PRIMARY KEY, \"stream id\" text NOT NULL);"
    }
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        self.phases.lock().unwrap().push(ctx.phase);
        let mut rows: Vec<Vec<&(dyn ToSql + Sync)>> = Vec::new();
        for e in events {
            rows.push(vec![&e.position, &e.stream_id]);
        }
        let written = copy_rows(
            tx,
            "seen rows",
            &[("position", Type::INT8), ("stream id", Type::TEXT)],
            rows,
        )
        .await?;
        assert_eq!(written, events.len() as u64);
        Ok(())
    }
}

async fn note(db: &TestDb, from: i64, count: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 's-' || i, 1, 'Noted', '{}' FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) i",
            &[&from, &count],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn copy_rows_loads_the_first_pass_and_only_it_is_a_rebuild() {
    let db = TestDb::migrated().await;
    note(&db, 0, 250).await;
    let projector = Copier {
        name: ProjectorName::new("copier").unwrap(),
        version: Version::new(1, 0, 0),
        phases: Mutex::new(Vec::new()),
    };
    let options = ReplayOptions {
        batch_size: 100,
        ..ReplayOptions::default()
    };
    replay_with(&db, &projector, options.clone()).await;
    assert_eq!(*projector.phases.lock().unwrap(), [Phase::Rebuild; 3]);
    note(&db, 250, 10).await;
    replay_with(&db, &projector, options).await;
    assert_eq!(projector.phases.lock().unwrap()[3..], [Phase::Replay]);
    let client = db.client().await;
    let (rows, streams): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT \"stream id\") FROM copier_v1_0_0.\"seen rows\"",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((rows, streams), (260, 260));
}
