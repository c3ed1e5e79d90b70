//! `coord-bench replay`: events per second of full replays of the reference
//! bank projector as Rust (batch-folding), per-event config SQL and
//! set-based config SQL, beside the raw client read speed (binary `COPY ...
//! TO STDOUT`) of the same events, in `--rounds` rounds of one raw read then
//! one replay of each kind (each ratio is a round's read over the same
//! round's replay; the figures are medians over the rounds, decision 0088);
//! the peak memory of the replays; with `--fail-every N`, after the rounds,
//! the same replays under `on_error = "park"` with one event in N failing,
//! beside the median clean rate; and a check that every projector's balances
//! equal a from-scratch SQL computation.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use coord::replay::{ReplayOptions, DEFAULT_BATCH_BYTES};
use coord::{Actor, OnError, ProjectorName};
use futures_util::{pin_mut, StreamExt};

use crate::bank::{self, Kind};
use crate::reference::BalancesProjector;
use crate::support::{median, peak_rss_mb, reset_peak_rss, BenchDb, Common};
use crate::OutputFormat;

/// Arguments of `coord-bench replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events in the store.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Events per replay batch.
    #[arg(long, default_value_t = 50_000)]
    batch_size: usize,
    /// Bytes per replay batch (see `ReplayOptions::batch_bytes`).
    #[arg(long, default_value_t = DEFAULT_BATCH_BYTES)]
    batch_bytes: usize,
    /// Projector kinds to replay, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Rust, Kind::Sql, Kind::SqlBatch])]
    kinds: Vec<Kind>,
    /// Rounds of one raw read followed by one replay of each kind; the
    /// figures are the medians over the rounds, each ratio the median of
    /// the per-round ratios (decision 0088).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// After the rounds, make one event in N fail (no amount) and replay the Rust and
    /// set-based kinds again under `on_error = "park"`; the set-based kind
    /// with checks in `--rounds` rounds of a clean then a park replay.
    #[arg(long)]
    fail_every: Option<i64>,
    #[command(flatten)]
    common: Common,
}

const RAW_READ: &str = "COPY (SELECT position, stream_id, stream_version, event_type, data, \
    metadata, recorded_at FROM coord.events ORDER BY position) TO STDOUT (FORMAT binary)";

/// Makes the amount of one event in `$1` (not the openings) a string: every
/// kind of the projector fails on it.
const BREAK_EVENTS: &str = "UPDATE coord.events SET data = jsonb_set(data, '{amount}', '\"n/a\"') \
    WHERE position % $1::bigint = 0 AND event_type <> 'AccountOpened'";

/// The events [`BREAK_EVENTS`] breaks, as they were (`{every}` filled in:
/// a utility statement takes no parameters), so that a round can put them
/// back with [`MEND_EVENTS`].
const SAVE_EVENTS: &str =
    "CREATE TABLE public.bench_unbroken AS SELECT position, data FROM coord.events \
    WHERE position % {every} = 0 AND event_type <> 'AccountOpened'";

const MEND_EVENTS: &str = "UPDATE coord.events e SET data = u.data FROM public.bench_unbroken u \
    WHERE e.position = u.position";

/// One round: a raw read, then one full replay of each requested kind,
/// seconds apart, so that each ratio compares a read and a replay timed
/// under the same host speed (decision 0088). In [`Figures`] the same
/// fields hold the medians over the rounds.
#[derive(Clone, Default, serde::Serialize)]
struct Round {
    raw_read_s: f64,
    raw_read_events_per_s: f64,
    replay_s: Option<f64>,
    replay_events_per_s: Option<f64>,
    ratio: Option<f64>,
    sql_replay_s: Option<f64>,
    sql_replay_events_per_s: Option<f64>,
    sql_ratio: Option<f64>,
    sql_batch_replay_s: Option<f64>,
    sql_batch_events_per_s: Option<f64>,
    sql_batch_ratio: Option<f64>,
}

impl Round {
    /// Records a replay of `kind` that took `secs` for `events` events.
    fn record(&mut self, kind: Kind, events: f64, secs: f64) {
        let (s, rate, ratio) = (
            Some(secs),
            Some(events / secs),
            Some(self.raw_read_s / secs),
        );
        match kind {
            Kind::Rust => (self.replay_s, self.replay_events_per_s, self.ratio) = (s, rate, ratio),
            Kind::Sql => {
                (
                    self.sql_replay_s,
                    self.sql_replay_events_per_s,
                    self.sql_ratio,
                ) = (s, rate, ratio)
            }
            Kind::SqlBatch => {
                (
                    self.sql_batch_replay_s,
                    self.sql_batch_events_per_s,
                    self.sql_batch_ratio,
                ) = (s, rate, ratio)
            }
        }
    }

    /// Every field the median of that field over `rounds` (each ratio the
    /// median of the per-round ratios, not a ratio of medians).
    fn median(rounds: &[Round]) -> Round {
        let m = |field: fn(&Round) -> Option<f64>| median(rounds.iter().filter_map(field));
        Round {
            raw_read_s: m(|r| Some(r.raw_read_s)).unwrap_or_default(),
            raw_read_events_per_s: m(|r| Some(r.raw_read_events_per_s)).unwrap_or_default(),
            replay_s: m(|r| r.replay_s),
            replay_events_per_s: m(|r| r.replay_events_per_s),
            ratio: m(|r| r.ratio),
            sql_replay_s: m(|r| r.sql_replay_s),
            sql_replay_events_per_s: m(|r| r.sql_replay_events_per_s),
            sql_ratio: m(|r| r.sql_ratio),
            sql_batch_replay_s: m(|r| r.sql_batch_replay_s),
            sql_batch_events_per_s: m(|r| r.sql_batch_events_per_s),
            sql_batch_ratio: m(|r| r.sql_batch_ratio),
        }
    }
}

/// The smallest of `values`; `None` when there are none.
fn min(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.min_by(f64::total_cmp)
}

#[derive(Default, serde::Serialize)]
struct Figures {
    events: i64,
    streams: i64,
    batch_size: usize,
    batch_bytes: usize,
    generate_s: f64,
    raw_read_bytes: u64,
    /// The medians over the rounds, under the field names of one round.
    #[serde(flatten)]
    median: Round,
    /// The worst round's ratio of each kind.
    ratio_min: Option<f64>,
    sql_ratio_min: Option<f64>,
    sql_batch_ratio_min: Option<f64>,
    /// Every round, in order.
    rounds: Vec<Round>,
    results_equal: bool,
    /// Peak resident memory of coord-bench during the clean replays (over
    /// every round).
    peak_rss_mb: f64,
    fail_every: Option<i64>,
    failing_events: Option<u64>,
    /// The park replays' rates, and each over the median clean rate of its
    /// kind.
    park_events_per_s: Option<f64>,
    park_ratio: Option<f64>,
    /// The set-based projector with checks naming the failing events
    /// (decision 0089), in `--rounds` rounds of a clean replay then a park
    /// replay on the store broken just for it: the medians of its clean
    /// rate, its park rate, and the rounds' own park over clean ratios.
    sql_batch_checked_events_per_s: Option<f64>,
    sql_batch_park_events_per_s: Option<f64>,
    sql_batch_park_ratio: Option<f64>,
    /// The worst round's park over clean ratio, and every round's
    /// `[clean, park]` rates.
    sql_batch_park_ratio_min: Option<f64>,
    checked_rounds: Vec<[f64; 2]>,
    /// The set-based projector without checks under park (the failing
    /// events found by searching the batch), over its median clean rate.
    sql_batch_unchecked_park_events_per_s: Option<f64>,
    sql_batch_unchecked_park_ratio: Option<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.events < 1 {
        bail!("--events must be at least 1");
    }
    if args.rounds < 1 {
        bail!("--rounds must be at least 1");
    }
    if args.fail_every.is_some_and(|n| n < 2) {
        bail!("--fail-every must be at least 2");
    }
    let db = BenchDb::create(&args.common.database_url, "replay").await?;
    let result = bench(&args, &db).await;
    db.drop_database().await?;
    let figures = result?;
    match args.common.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&figures)?),
        OutputFormat::Text => print_text(&figures),
    }
    if !figures.results_equal {
        bail!("the replayed balances differ from the from-scratch computation");
    }
    Ok(())
}

fn print_text(f: &Figures) {
    println!(
        "events: {} over {} streams (generated in {:.1} s), batch size {}, batch bytes {}",
        f.events, f.streams, f.generate_s, f.batch_size, f.batch_bytes
    );
    println!(
        "{} rounds of a raw client read (binary COPY TO STDOUT, {} bytes) then one replay of each kind:",
        f.rounds.len(),
        f.raw_read_bytes
    );
    for (i, r) in f.rounds.iter().enumerate() {
        println!(
            "round {}: raw read {:.2} s, {:.0} events/s",
            i + 1,
            r.raw_read_s,
            r.raw_read_events_per_s
        );
        print_replays(r, "  ");
    }
    let m = &f.median;
    println!(
        "median over the rounds (ratios: median of the per-round ratios):\n  raw read {:.2} s, {:.0} events/s",
        m.raw_read_s, m.raw_read_events_per_s
    );
    print_replays(m, "  ");
    for (label, min) in [
        ("Rust", f.ratio_min),
        ("config SQL", f.sql_ratio_min),
        ("set-based", f.sql_batch_ratio_min),
    ] {
        if let Some(min) = min {
            println!("worst round's ratio, {label}: {min:.2}");
        }
    }
    println!(
        "peak RSS of coord-bench during the replays: {:.0} MB",
        f.peak_rss_mb
    );
    if let (Some(n), Some(failing)) = (f.fail_every, f.failing_events) {
        println!("with one event in {n} failing ({failing} events), on_error = park:");
        if let (Some(rate), Some(ratio)) = (f.park_events_per_s, f.park_ratio) {
            println!("  Rust:      {rate:.0} events/s, {ratio:.2} of its median clean rate");
        }
        if let (Some(clean), Some(rate), Some(ratio)) = (
            f.sql_batch_checked_events_per_s,
            f.sql_batch_park_events_per_s,
            f.sql_batch_park_ratio,
        ) {
            println!(
                "  set-based with checks: {rate:.0} events/s, {ratio:.2} of its clean rate \
                 ({clean:.0} events/s; medians of {} rounds, worst round {:.2})",
                f.checked_rounds.len(),
                f.sql_batch_park_ratio_min.unwrap_or_default()
            );
        }
        if let (Some(rate), Some(ratio)) = (
            f.sql_batch_unchecked_park_events_per_s,
            f.sql_batch_unchecked_park_ratio,
        ) {
            println!("  set-based without checks: {rate:.0} events/s, {ratio:.2} of its median clean rate");
        }
    }
    println!(
        "results equal to a from-scratch SQL computation: {}",
        f.results_equal
    );
}

fn print_replays(r: &Round, indent: &str) {
    let line = |label: &str, secs: Option<f64>, rate: Option<f64>, ratio: Option<f64>| {
        if let (Some(secs), Some(rate), Some(ratio)) = (secs, rate, ratio) {
            println!("{indent}{label:<40}{secs:.2} s, {rate:.0} events/s, ratio {ratio:.2}");
        }
    };
    line(
        "replay, Rust batch-aware projector:",
        r.replay_s,
        r.replay_events_per_s,
        r.ratio,
    );
    line(
        "replay, config SQL projector:",
        r.sql_replay_s,
        r.sql_replay_events_per_s,
        r.sql_ratio,
    );
    line(
        "replay, set-based config SQL projector:",
        r.sql_batch_replay_s,
        r.sql_batch_events_per_s,
        r.sql_batch_ratio,
    );
}

async fn bench(args: &Args, db: &BenchDb) -> anyhow::Result<Figures> {
    let mut client = db.client().await?;
    let streams = bank::STREAMS.min(args.events);
    let n = args.events as f64;
    let mut f = Figures {
        events: args.events,
        streams,
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        results_equal: true,
        ..Figures::default()
    };

    let started = Instant::now();
    bank::generate(&client, 0, args.events, streams).await?;
    client.batch_execute("VACUUM ANALYZE coord.events").await?;
    f.generate_s = started.elapsed().as_secs_f64();

    let pool = coord::pool(&db.url, 4)?;
    let options = ReplayOptions {
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        ..ReplayOptions::default()
    };
    let actor = Actor::new("bench", "coord-bench");
    for round in 1..=args.rounds {
        let mut r = Round::default();
        bank::settle(&client).await?;
        let started = Instant::now();
        let stream = client.copy_out(RAW_READ).await?;
        pin_mut!(stream);
        let mut bytes = 0;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.len() as u64;
        }
        r.raw_read_s = started.elapsed().as_secs_f64();
        r.raw_read_events_per_s = n / r.raw_read_s;
        f.raw_read_bytes = bytes;

        reset_peak_rss();
        for &kind in &args.kinds {
            let name = format!("bench_{}_r{round}", kind_name(kind));
            let projector = bank::projector(kind, &name, OnError::Fail)?;
            let secs =
                checked_replay(&pool, &mut client, projector.as_ref(), &options, &mut f).await?;
            r.record(kind, n, secs);
            // Untimed: drop the version (its schema and tables), so that
            // every replay starts from the same database (the store alone).
            coord::abort(&mut client, &name, &actor).await?;
        }
        f.peak_rss_mb = f.peak_rss_mb.max(peak_rss_mb());
        f.rounds.push(r);
    }
    f.median = Round::median(&f.rounds);
    f.ratio_min = min(f.rounds.iter().filter_map(|r| r.ratio));
    f.sql_ratio_min = min(f.rounds.iter().filter_map(|r| r.sql_ratio));
    f.sql_batch_ratio_min = min(f.rounds.iter().filter_map(|r| r.sql_batch_ratio));

    if let Some(every) = args.fail_every {
        // The checked set-based projector, in rounds of a clean replay then
        // a park replay on the store broken for it and mended after.
        if args.kinds.contains(&Kind::SqlBatch) {
            client
                .batch_execute(&SAVE_EVENTS.replace("{every}", &every.to_string()))
                .await?;
            for round in 1..=args.rounds {
                let mut rates = [0.0; 2];
                for (i, on_error) in [OnError::Fail, OnError::Park].into_iter().enumerate() {
                    let name = format!("{}_sql_batch_checked_r{round}", ["clean", "park"][i]);
                    if on_error == OnError::Park {
                        client.execute(BREAK_EVENTS, &[&every]).await?;
                        client.batch_execute("VACUUM ANALYZE coord.events").await?;
                    }
                    let projector = bank::checked_projector(&name, on_error)?;
                    let secs =
                        checked_replay(&pool, &mut client, projector.as_ref(), &options, &mut f)
                            .await?;
                    rates[i] = n / secs;
                    coord::abort(&mut client, &name, &actor).await?;
                }
                client.execute(MEND_EVENTS, &[]).await?;
                client.batch_execute("VACUUM ANALYZE coord.events").await?;
                f.checked_rounds.push(rates);
            }
            let rounds = &f.checked_rounds;
            f.sql_batch_checked_events_per_s = median(rounds.iter().map(|r| r[0]));
            f.sql_batch_park_events_per_s = median(rounds.iter().map(|r| r[1]));
            f.sql_batch_park_ratio = median(rounds.iter().map(|r| r[1] / r[0]));
            f.sql_batch_park_ratio_min = min(rounds.iter().map(|r| r[1] / r[0]));
            client
                .batch_execute("DROP TABLE public.bench_unbroken")
                .await?;
        }
        let failing = client.execute(BREAK_EVENTS, &[&every]).await?;
        client.batch_execute("VACUUM ANALYZE coord.events").await?;
        f.fail_every = Some(every);
        f.failing_events = Some(failing);
        for &kind in &args.kinds {
            let clean = match kind {
                Kind::Rust => f.median.replay_events_per_s,
                Kind::SqlBatch => f.median.sql_batch_events_per_s,
                Kind::Sql => continue,
            };
            let name = format!("park_{}", kind_name(kind));
            let projector = match kind {
                // Names every failing event of a call (decision 0070).
                Kind::Rust => Arc::new(
                    BalancesProjector::new(
                        ProjectorName::new(&name).map_err(anyhow::Error::msg)?,
                        semver::Version::new(1, 0, 0),
                    )
                    .with_on_error(OnError::Park)
                    .naming_every_failure(),
                ),
                _ => bank::projector(kind, &name, OnError::Park)?,
            };
            let secs =
                checked_replay(&pool, &mut client, projector.as_ref(), &options, &mut f).await?;
            let rate = n / secs;
            let ratio = clean.map(|c| rate / c);
            match kind {
                Kind::Rust => (f.park_events_per_s, f.park_ratio) = (Some(rate), ratio),
                _ => {
                    (
                        f.sql_batch_unchecked_park_events_per_s,
                        f.sql_batch_unchecked_park_ratio,
                    ) = (Some(rate), ratio)
                }
            }
        }
    }
    Ok(f)
}

/// Replays `projector` and compares its balances with a from-scratch
/// computation (into `f.results_equal`); returns the replay's seconds.
async fn checked_replay(
    pool: &deadpool_postgres::Pool,
    client: &mut tokio_postgres::Client,
    projector: &dyn coord::Projector,
    options: &ReplayOptions,
    f: &mut Figures,
) -> anyhow::Result<f64> {
    let secs = bank::replay(pool, client, projector, options).await?;
    f.results_equal &= bank::balances_equal(client, projector).await?;
    Ok(secs)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Rust => "rust",
        Kind::Sql => "sql",
        Kind::SqlBatch => "sql_batch",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median([0.7, 0.52, 0.84].into_iter()), Some(0.7));
        assert_eq!(median([2.0, 0.5, 1.0, 1.5].into_iter()), Some(1.25));
        assert_eq!(median(std::iter::empty()), None);
        assert_eq!(min([0.7, 0.52, 0.84].into_iter()), Some(0.52));
    }

    #[test]
    fn ratios_are_medians_of_per_round_ratios() {
        // Read and replay drift together within a round; the median ratio
        // is not the ratio of the median read to the median replay.
        let rounds: Vec<Round> = [(1.0, 2.0), (2.0, 2.5), (1.5, 3.0)]
            .into_iter()
            .map(|(raw, replay)| {
                let mut r = Round {
                    raw_read_s: raw,
                    raw_read_events_per_s: 100.0 / raw,
                    ..Round::default()
                };
                r.record(Kind::Rust, 100.0, replay);
                r
            })
            .collect();
        let m = Round::median(&rounds);
        assert_eq!(m.raw_read_s, 1.5);
        assert_eq!(m.replay_s, Some(2.5));
        assert_eq!(m.ratio, Some(0.5));
        assert_eq!(m.sql_batch_ratio, None);
    }
}
