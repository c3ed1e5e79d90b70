//! The projector of `coord-bench activation`: balance and event count per
//! account, folded per batch, so lost or doubled events show in the counts.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use coord::{ApplyContext, Event, HandlerError, Projector, ProjectorName};
use semver::Version;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

/// Balance and event count per account, folded per batch.
pub(super) struct Ledger {
    name: ProjectorName,
    version: Version,
}

impl Ledger {
    pub(super) fn at(major: u64) -> Arc<dyn Projector> {
        Arc::new(Self {
            name: ProjectorName::new("ledger").expect("valid"),
            version: Version::new(major, 0, 0),
        })
    }
}

#[async_trait]
impl Projector for Ledger {
    fn name(&self) -> &ProjectorName {
        &self.name
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        ["AccountOpened", "MoneyDeposited"]
            .map(String::from)
            .to_vec()
    }
    fn tables(&self) -> &str {
        "CREATE TABLE ledger (account text PRIMARY KEY, amount bigint NOT NULL, events bigint NOT NULL);"
    }
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        _: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut fold: HashMap<&str, (i64, i64)> = HashMap::new();
        for e in events {
            let entry = fold.entry(e.stream_id.as_str()).or_default();
            entry.0 += e.data.get("amount").and_then(|a| a.as_i64()).unwrap_or(0);
            entry.1 += 1;
        }
        let accounts: Vec<&str> = fold.keys().copied().collect();
        let amounts: Vec<i64> = accounts.iter().map(|a| fold[a].0).collect();
        let counts: Vec<i64> = accounts.iter().map(|a| fold[a].1).collect();
        // Unnamed and typed: one round trip (a named statement would cost one
        // more to prepare on every call).
        tx.query_typed(
            "INSERT INTO ledger SELECT * FROM unnest($1, $2, $3) \
             ON CONFLICT (account) DO UPDATE SET amount = ledger.amount + EXCLUDED.amount, events = ledger.events + EXCLUDED.events",
            &[
                (&accounts, Type::TEXT_ARRAY),
                (&amounts, Type::INT8_ARRAY),
                (&counts, Type::INT8_ARRAY),
            ],
        )
        .await?;
        Ok(())
    }
}
