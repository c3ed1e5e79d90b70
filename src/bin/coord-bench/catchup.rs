//! `coord-bench catchup`: the time to catch a replayed projector version up
//! with a fixed delta of new events, on stores of different sizes in one
//! run (by default 1M and 10M events): DESIGN.md promises catch-up in
//! proportion to the delta, not to the store. Each size has a database of
//! its own, built first; then, in each of `--repeat` rounds, every store
//! gets `--delta` new events and is caught up, the stores back to back
//! (order alternating), so that a round's ratio compares catch-ups timed
//! seconds apart rather than minutes (decision 0092).

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use coord::replay::{ReplayOptions, DEFAULT_BATCH_BYTES};
use coord::{OnError, Projector};

use crate::bank::{self, Kind};
use crate::support::{median, BenchDb, Common};
use crate::OutputFormat;

/// Arguments of `coord-bench catchup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store sizes to measure at, ascending, comma-separated; the store
    /// grows from one to the next.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000_i64, 10_000_000])]
    stores: Vec<i64>,
    /// New events per catch-up.
    #[arg(long, default_value_t = 10_000)]
    delta: i64,
    /// Rounds: in each, one catch-up per store size and kind, back to
    /// back (medians and per-round ratios are reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Projector kinds, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Rust, Kind::SqlBatch])]
    kinds: Vec<Kind>,
    #[command(flatten)]
    common: Common,
}

#[derive(serde::Serialize)]
struct Point {
    store_events: i64,
    kind: Kind,
    /// Median seconds to catch up `delta` new events.
    catchup_s: f64,
    catchup_events_per_s: f64,
    /// Seconds to bring the version to the store's end before measuring.
    grow_catchup_s: f64,
}

#[derive(serde::Serialize)]
struct Figures {
    delta: i64,
    repeat: usize,
    points: Vec<Point>,
    /// Per kind: the median over the rounds of each round's catch-up time
    /// on the largest store / on the smallest.
    growth: Vec<(Kind, f64)>,
    /// Per kind: the worst round's ratio.
    growth_max: Vec<(Kind, f64)>,
    /// Per kind: every round's ratio.
    growth_rounds: Vec<(Kind, Vec<f64>)>,
    results_equal: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.stores.is_empty() || args.stores.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--stores must be ascending");
    }
    if args.delta < 1 || args.repeat < 1 || args.stores[0] < 1 {
        bail!("--delta, --repeat and the store sizes must be at least 1");
    }
    // Every database created is dropped, whatever fails after it.
    let mut dbs = Vec::new();
    let result = async {
        for size in &args.stores {
            dbs.push(BenchDb::create(&args.common.database_url, &format!("catchup_{size}")).await?);
        }
        bench(&args, &dbs).await
    }
    .await;
    for db in dbs {
        db.drop_database().await?;
    }
    let figures = result?;
    match args.common.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&figures)?),
        OutputFormat::Text => {
            println!(
                "catch-up of {} new events (median of {} rounds):",
                figures.delta, figures.repeat
            );
            for p in &figures.points {
                println!(
                    "  store {:>11} events, {:?}: {:.3} s ({:.0} events/s); reaching the store's end took {:.1} s",
                    p.store_events, p.kind, p.catchup_s, p.catchup_events_per_s, p.grow_catchup_s
                );
            }
            for ((kind, growth), (_, worst)) in figures.growth.iter().zip(&figures.growth_max) {
                println!(
                    "  {kind:?}: largest store / smallest = {growth:.2} (median of the rounds' ratios; worst round {worst:.2})"
                );
            }
            println!(
                "results equal to a from-scratch SQL computation: {}",
                figures.results_equal
            );
        }
    }
    if !figures.results_equal {
        bail!("the caught-up balances differ from the from-scratch computation");
    }
    Ok(())
}

/// Leaves the database as a long-running one would be after growing the
/// store. The projections' tables are rewritten compact (`VACUUM FULL`):
/// the catch-up that brought each projector to the store's end updated
/// every balance hundreds of times in one burst (900 times each at 10M,
/// 100 at 1M), faster than pruning and autovacuum reclaim, and left the
/// larger store's table several times the size of the smaller one's,
/// where a live database's tables stay at the size autovacuum holds them
/// to whatever the history; measured catch-ups would then compare the
/// bloat of the projections' tables rather than the stores (decision
/// 0092). coord's own table is vacuumed and analysed and a checkpoint
/// written (the burst's WAL would otherwise be flushed during the
/// measured catch-ups).
async fn settle(
    client: &tokio_postgres::Client,
    projectors: &[(Kind, Arc<dyn Projector>)],
) -> anyhow::Result<()> {
    for (_, projector) in projectors {
        let schema = coord::quote_ident(&coord::schema_name(projector.name(), projector.version()));
        client
            .batch_execute(&format!("VACUUM (FULL, ANALYZE) {schema}.balances"))
            .await?;
    }
    // One statement per call: VACUUM cannot run in the implicit
    // transaction of a multi-statement query.
    client
        .batch_execute("VACUUM ANALYZE coord.projector_versions")
        .await?;
    bank::settle(client).await
}

/// One store size in a database of its own, its projectors caught up with
/// it and the database settled.
struct Store {
    size: i64,
    client: tokio_postgres::Client,
    pool: deadpool_postgres::Pool,
    projectors: Vec<(Kind, Arc<dyn Projector>)>,
    /// Events in the store.
    end: i64,
    /// Per projector, the seconds its first catch-up (the whole store) took.
    grow: Vec<f64>,
}

impl Store {
    async fn build(
        db: &BenchDb,
        size: i64,
        streams: i64,
        kinds: &[Kind],
        options: &ReplayOptions,
    ) -> anyhow::Result<Self> {
        let mut client = db.client().await?;
        let pool = coord::pool(&db.url, 4)?;
        let mut projectors = Vec::new();
        for &kind in kinds {
            let name = format!("catchup_{kind:?}").to_lowercase();
            let projector = bank::projector(kind, &name, OnError::Fail)?;
            coord::replay::start_replay(
                &mut client,
                projector.as_ref(),
                &coord::Actor::new("bench", "coord-bench catchup"),
            )
            .await?;
            projectors.push((kind, projector));
        }
        let started = Instant::now();
        bank::generate(&client, 0, size, streams).await?;
        client.batch_execute("VACUUM ANALYZE coord.events").await?;
        eprintln!(
            "store of {size} events generated ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let mut grow = Vec::new();
        for (_, projector) in &projectors {
            let (secs, _) = bank::catch_up_once(&pool, projector.as_ref(), options).await?;
            grow.push(secs);
        }
        settle(&client, &projectors).await?;
        Ok(Self {
            size,
            client,
            pool,
            projectors,
            end: size,
            grow,
        })
    }
}

async fn bench(args: &Args, dbs: &[BenchDb]) -> anyhow::Result<Figures> {
    let options = ReplayOptions {
        batch_bytes: DEFAULT_BATCH_BYTES,
        lag_threshold: 1,
        ..ReplayOptions::default()
    };
    let streams = bank::STREAMS.min(args.stores[0]);
    let mut stores = Vec::new();
    for (&size, db) in args.stores.iter().zip(dbs) {
        stores.push(Store::build(db, size, streams, &args.kinds, &options).await?);
    }
    let kinds = args.kinds.len();
    // samples[store][kind][round]
    let mut samples = vec![vec![Vec::new(); kinds]; stores.len()];
    for round in 0..args.repeat {
        // Alternate the order, so that neither size always follows the
        // other's writes.
        let mut order: Vec<usize> = (0..stores.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for s in order {
            let store = &mut stores[s];
            bank::generate(&store.client, store.end, args.delta, streams).await?;
            store.end += args.delta;
            for (k, (_, projector)) in store.projectors.iter().enumerate() {
                let (secs, applied) =
                    bank::catch_up_once(&store.pool, projector.as_ref(), &options).await?;
                if applied != args.delta as u64 {
                    bail!(
                        "a catch-up applied {applied} events, expected {}",
                        args.delta
                    );
                }
                samples[s][k].push(secs);
            }
        }
    }
    let mut points = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for (k, (kind, _)) in store.projectors.iter().enumerate() {
            let median = median(samples[s][k].iter().copied()).expect("--repeat is at least 1");
            points.push(Point {
                store_events: store.size,
                kind: *kind,
                catchup_s: median,
                catchup_events_per_s: args.delta as f64 / median,
                grow_catchup_s: store.grow[k],
            });
        }
    }
    let mut results_equal = true;
    for store in &stores {
        for (_, projector) in &store.projectors {
            results_equal &= bank::balances_equal(&store.client, projector.as_ref()).await?;
        }
    }
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let (mut growth, mut growth_max, mut growth_rounds) = (Vec::new(), Vec::new(), Vec::new());
    for (k, &kind) in args.kinds.iter().enumerate() {
        let per_round: Vec<f64> = last[k].iter().zip(&first[k]).map(|(l, f)| l / f).collect();
        growth.push((
            kind,
            median(per_round.iter().copied()).expect("--repeat is at least 1"),
        ));
        growth_max.push((kind, per_round.iter().copied().fold(f64::MIN, f64::max)));
        growth_rounds.push((kind, per_round));
    }
    Ok(Figures {
        delta: args.delta,
        repeat: args.repeat,
        points,
        growth,
        growth_max,
        growth_rounds,
        results_equal,
    })
}
