//! A reference projector written in Rust against the batch-aware API: bank
//! balances per account, folded in memory per batch and written with one
//! statement per kind of change. Used by `coord-bench` and, through
//! `#[path]`, by the integration tests; it uses only the public API, as an
//! application projector would, and is not part of the library.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use async_trait::async_trait;
use futures_util::future::try_join;
use semver::Version;
use tokio_postgres::Transaction;

use coord::projector::{copy_rows, EventError, EventErrors};
use coord::{ApplyContext, Event, HandlerError, OnError, Phase, Projector, ProjectorName};
use sha2::{Digest, Sha256};
use tokio_postgres::types::{ToSql, Type};

// Every batch updates most rows: free space on each page keeps those
// updates HOT (no index entries, no page splits).
const TABLES: &str =
    "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0) WITH (fillfactor = 50);";

const INSERT: &str = "INSERT INTO balances (account, amount) \
    SELECT * FROM unnest($1::text[], $2::bigint[])";

const UPDATE: &str = "UPDATE balances AS b SET amount = b.amount + d.delta \
    FROM unnest($1::text[], $2::bigint[]) AS d(account, delta) WHERE b.account = d.account";

/// Balances per account from `AccountOpened`, `MoneyDeposited` and
/// `MoneyWithdrawn` (`data.amount`), in table `balances (account, amount)`:
/// the same result as the config-defined projector of DESIGN.md.
#[derive(Clone, Debug)]
pub struct BalancesProjector {
    name: ProjectorName,
    version: Version,
    on_error: OnError,
    every_failure: bool,
}

impl BalancesProjector {
    /// The projector `name@version`, failing on a failing event.
    pub fn new(name: ProjectorName, version: Version) -> Self {
        Self {
            name,
            version,
            on_error: OnError::Fail,
            every_failure: false,
        }
    }

    /// The same, checking every event of a call before failing and naming
    /// all the failing ones in one [`EventErrors`]: a replay under `park`
    /// then parks them and calls it once more, instead of once more per
    /// failing event.
    #[allow(dead_code)] // not every user of this file parks
    pub fn naming_every_failure(mut self) -> Self {
        self.every_failure = true;
        self
    }

    /// The same with another `on_error` policy.
    #[allow(dead_code)] // not every user of this file parks
    pub fn with_on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }
}

/// A multiplicative hasher (FxHash's) for the fold's map of accounts:
/// the standard SipHash, resistant to crafted keys, cost more per event
/// than the rest of the fold, and the keys are the batch's own stream ids.
#[derive(Default)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(K);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Fold {
    opened: bool,
    delta: i64,
}

fn amount(event: &Event) -> Result<i64, EventError> {
    event
        .data
        .get("amount")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| {
            EventError::new(
                event.position,
                format!(
                    "event at position {} ({}) has no integer data.amount",
                    event.position, event.event_type
                ),
            )
        })
}

#[async_trait]
impl Projector for BalancesProjector {
    fn name(&self) -> &ProjectorName {
        &self.name
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        vec![
            "AccountOpened".into(),
            "MoneyDeposited".into(),
            "MoneyWithdrawn".into(),
        ]
    }
    fn tables(&self) -> &str {
        TABLES
    }
    fn on_error(&self) -> OnError {
        self.on_error
    }
    /// It reads `data.amount` only: replays need not send the metadata.
    fn replay_reads_metadata(&self) -> bool {
        false
    }
    /// Of `data`, it reads `amount` only: the decoder skips the rest.
    fn replay_reads_data_keys(&self) -> Option<Vec<String>> {
        Some(vec!["amount".into()])
    }
    fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(format!(
            "rust BalancesProjector 1\0{TABLES}"
        )))
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut order: Vec<&str> = Vec::new();
        let mut folds: HashMap<&str, Fold, BuildHasherDefault<FoldHasher>> = HashMap::default();
        let mut failures = Vec::new();
        for event in events {
            let account = event.stream_id.as_str();
            let fold = folds.entry(account).or_insert_with(|| {
                order.push(account);
                Fold::default()
            });
            match event.event_type.as_str() {
                // Like the SQL handlers: changes before the account exists
                // touch no row.
                "AccountOpened" => {
                    *fold = Fold {
                        opened: true,
                        delta: 0,
                    }
                }
                "MoneyDeposited" | "MoneyWithdrawn" => match amount(event) {
                    Ok(a) if event.event_type == "MoneyDeposited" => fold.delta += a,
                    Ok(a) => fold.delta -= a,
                    // Naming the event lets a replay park it without bisecting.
                    Err(e) if !self.every_failure => return Err(e.into()),
                    Err(e) => failures.push(e),
                },
                _ => {}
            }
        }
        if !failures.is_empty() {
            return Err(EventErrors::new(failures).into());
        }
        let (mut new_accounts, mut new_amounts) = (Vec::new(), Vec::new());
        let (mut accounts, mut deltas) = (Vec::new(), Vec::new());
        for account in order {
            let fold = &folds[account];
            if fold.opened {
                new_accounts.push(account);
                new_amounts.push(fold.delta);
            } else if fold.delta != 0 {
                accounts.push(account);
                deltas.push(fold.delta);
            }
        }
        if ctx.phase == Phase::Rebuild && !new_accounts.is_empty() {
            // The tables started empty in this replay: new rows go in by
            // binary COPY, then the changes to older ones.
            let mut rows: Vec<Vec<&(dyn ToSql + Sync)>> = Vec::with_capacity(new_accounts.len());
            for (account, amount) in new_accounts.iter().zip(&new_amounts) {
                rows.push(vec![account, amount]);
            }
            copy_rows(
                tx,
                "balances",
                &[("account", Type::TEXT), ("amount", Type::INT8)],
                rows,
            )
            .await?;
            if !accounts.is_empty() {
                tx.execute(UPDATE, &[&accounts, &deltas]).await?;
            }
            return Ok(());
        }
        // Pipelined; the two touch disjoint accounts.
        try_join(
            async {
                if new_accounts.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(INSERT, &[&new_accounts, &new_amounts]).await
                }
            },
            async {
                if accounts.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(UPDATE, &[&accounts, &deltas]).await
                }
            },
        )
        .await?;
        Ok(())
    }
}
