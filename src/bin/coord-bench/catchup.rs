//! `coord-bench catchup`: the time to catch a replayed projector version up
//! with a fixed delta of new events, on stores of growing size in one run
//! (by default 1M then 10M events): DESIGN.md promises catch-up in
//! proportion to the delta, not to the store.

use std::time::Instant;

use anyhow::bail;
use coord::replay::{ReplayOptions, DEFAULT_BATCH_BYTES};
use coord::{OnError, Projector};

use crate::bank::{self, Kind};
use crate::support::{BenchDb, Common};
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
    /// Catch-ups measured per store size (the median is reported).
    #[arg(long, default_value_t = 3)]
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
    /// Per kind: catch-up time on the largest store / on the smallest.
    growth: Vec<(Kind, f64)>,
    results_equal: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.stores.is_empty() || args.stores.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--stores must be ascending");
    }
    if args.delta < 1 || args.repeat < 1 || args.stores[0] < 1 {
        bail!("--delta, --repeat and the store sizes must be at least 1");
    }
    let db = BenchDb::create(&args.common.database_url, "catchup").await?;
    let result = bench(&args, &db).await;
    db.drop_database().await?;
    let figures = result?;
    match args.common.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&figures)?),
        OutputFormat::Text => {
            println!(
                "catch-up of {} new events (median of {}):",
                figures.delta, figures.repeat
            );
            for p in &figures.points {
                println!(
                    "  store {:>11} events, {:?}: {:.3} s ({:.0} events/s); reaching the store's end took {:.1} s",
                    p.store_events, p.kind, p.catchup_s, p.catchup_events_per_s, p.grow_catchup_s
                );
            }
            for (kind, growth) in &figures.growth {
                println!("  {kind:?}: largest store / smallest = {growth:.2}");
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
/// store: the projections' tables and coord's vacuumed and analysed (the
/// growing catch-up updated every balance hundreds of times; autovacuum
/// would otherwise run during the measured catch-ups, at 10M more than at
/// 1M) and a checkpoint written (the growing catch-up's WAL would
/// otherwise be flushed during them).
async fn settle(
    client: &tokio_postgres::Client,
    projectors: &[(Kind, std::sync::Arc<dyn Projector>)],
) -> anyhow::Result<()> {
    for (_, projector) in projectors {
        let schema = coord::quote_ident(&coord::schema_name(projector.name(), projector.version()));
        client
            .batch_execute(&format!("VACUUM ANALYZE {schema}.balances"))
            .await?;
    }
    // One statement per call: VACUUM cannot run in the implicit
    // transaction of a multi-statement query.
    client
        .batch_execute("VACUUM ANALYZE coord.projector_versions")
        .await?;
    bank::settle(client).await
}

async fn bench(args: &Args, db: &BenchDb) -> anyhow::Result<Figures> {
    let mut client = db.client().await?;
    let pool = coord::pool(&db.url, 4)?;
    let options = ReplayOptions {
        batch_bytes: DEFAULT_BATCH_BYTES,
        lag_threshold: 1,
        ..ReplayOptions::default()
    };
    let streams = bank::STREAMS.min(args.stores[0]);
    let mut projectors = Vec::new();
    for &kind in &args.kinds {
        let projector = bank::projector(
            kind,
            &format!("catchup_{kind:?}").to_lowercase(),
            OnError::Fail,
        )?;
        coord::replay::start_replay(
            &mut client,
            projector.as_ref(),
            &coord::Actor::new("bench", "coord-bench catchup"),
        )
        .await?;
        projectors.push((kind, projector));
    }
    let mut store = 0;
    let mut points = Vec::new();
    for &size in &args.stores {
        let started = Instant::now();
        bank::generate(&client, store, size - store, streams).await?;
        client.batch_execute("VACUUM ANALYZE coord.events").await?;
        store = size;
        eprintln!(
            "store at {store} events ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let mut grow = Vec::new();
        for (_, projector) in &projectors {
            let (secs, _) = bank::catch_up_once(&pool, projector.as_ref(), &options).await?;
            grow.push(secs);
        }
        settle(&client, &projectors).await?;
        let mut samples = vec![Vec::new(); projectors.len()];
        for _ in 0..args.repeat {
            bank::generate(&client, store, args.delta, streams).await?;
            store += args.delta;
            for (i, (_, projector)) in projectors.iter().enumerate() {
                let (secs, applied) =
                    bank::catch_up_once(&pool, projector.as_ref(), &options).await?;
                if applied != args.delta as u64 {
                    bail!(
                        "a catch-up applied {applied} events, expected {}",
                        args.delta
                    );
                }
                samples[i].push(secs);
            }
        }
        for (i, (kind, _)) in projectors.iter().enumerate() {
            let mut s = samples[i].clone();
            s.sort_by(f64::total_cmp);
            let median = s[s.len() / 2];
            points.push(Point {
                store_events: size,
                kind: *kind,
                catchup_s: median,
                catchup_events_per_s: args.delta as f64 / median,
                grow_catchup_s: grow[i],
            });
        }
    }
    let mut results_equal = true;
    for (_, projector) in &projectors {
        results_equal &= bank::balances_equal(&client, projector.as_ref()).await?;
    }
    let growth = args
        .kinds
        .iter()
        .map(|&kind| {
            let of_kind: Vec<&Point> = points.iter().filter(|p| p.kind == kind).collect();
            (
                kind,
                of_kind[of_kind.len() - 1].catchup_s / of_kind[0].catchup_s,
            )
        })
        .collect();
    Ok(Figures {
        delta: args.delta,
        repeat: args.repeat,
        points,
        growth,
        results_equal,
    })
}
