//! Timed publishing for `coord-bench activation`: every publish records when
//! it started and ended and its longest single attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coord::{Error, ExpectedVersion, NewEvent, ProjectorSet, Publisher, RetryPolicy};
use tokio::task::JoinHandle;

use crate::support::BenchDb;

/// Every publish of every publisher, as they end.
pub(super) type Attempts = Arc<Mutex<Vec<Attempt>>>;

/// A publisher task's result: events published, whether it was refused (0
/// or 1), and its connection, kept open as an application's pool keeps its
/// connections after a refusal (closing sixteen sessions at once would load
/// the server while the other refused publishers wake).
type Published = JoinHandle<anyhow::Result<(u64, u64, tokio_postgres::Client)>>;

/// Starts `publishers` publishers of `set`, each publishing deposits to
/// accounts in turn until it is refused or `stop` is set, recording every
/// publish in `attempts` (times since `origin`).
///
/// The publishers and their connections run on `runtime`, not on the
/// activation's: the applications they stand for run in processes of their
/// own, apart from the `coord` process that activates (in one runtime, the
/// activation's steps would queue behind the publishers' tasks).
#[allow(clippy::too_many_arguments)]
pub(super) async fn spawn_publishers(
    runtime: &tokio::runtime::Handle,
    db: &BenchDb,
    set: &ProjectorSet,
    publishers: usize,
    accounts: i64,
    origin: Instant,
    attempts: &Attempts,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<Published>> {
    let mut connected = Vec::new();
    for _ in 0..publishers {
        let url = db.url.clone();
        connected.push(
            runtime.spawn(async move { coord::connect(&url, Duration::from_secs(10)).await }),
        );
    }
    let mut tasks = Vec::new();
    for (i, client) in connected.into_iter().enumerate() {
        let mut client = client.await??;
        let (attempts, stop) = (attempts.clone(), stop.clone());
        let publisher = Publisher::new(set.clone());
        tasks.push(runtime.spawn(async move {
            let (mut published, mut refused) = (0u64, 0u64);
            let mut n = i as i64;
            while !stop.load(Ordering::SeqCst) {
                n += 7919;
                let account = format!("acct-{}", n % accounts + 1);
                let event =
                    NewEvent::new("MoneyDeposited", serde_json::json!({"amount": n % 50 + 1}));
                let start = origin.elapsed();
                let policy = RetryPolicy {
                    deadline: Duration::from_secs(30),
                    first_pause: Duration::from_millis(1),
                    max_pause: Duration::from_millis(5),
                };
                let (result, longest_try) =
                    publish_timed(&publisher, &mut client, &account, event, policy).await;
                attempts.lock().expect("not poisoned").push(Attempt {
                    start,
                    end: origin.elapsed(),
                    longest_try,
                });
                match result {
                    Ok(_) => published += 1,
                    Err(Error::StreamVersionConflict { .. }) => {}
                    Err(Error::NewerProjectorIsActive { .. }) => {
                        refused += 1;
                        break;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok((published, refused, client))
        }));
    }
    Ok(tasks)
}

/// One publish (with its retries): when it started and ended (since the
/// bench began), and its longest single attempt.
#[derive(Clone, Copy)]
pub(super) struct Attempt {
    pub(super) start: Duration,
    pub(super) end: Duration,
    pub(super) longest_try: Duration,
}

/// Publishes like [`Publisher::publish_with_retry`] (after a
/// `ProjectorIsActivating` refusal, waiting out the activation, which also
/// tells a stale publisher the outcome, or pausing briefly), timing each attempt:
/// returns the result and the longest attempt.
async fn publish_timed(
    publisher: &Publisher,
    client: &mut tokio_postgres::Client,
    account: &str,
    event: NewEvent,
    policy: RetryPolicy,
) -> (Result<(), Error>, Duration) {
    let started = Instant::now();
    let mut pause = policy.first_pause;
    let mut longest = Duration::ZERO;
    loop {
        let attempt = Instant::now();
        let outcome = async {
            let tx = client.transaction().await?;
            publisher
                .publish_and_commit(
                    tx,
                    account,
                    ExpectedVersion::Any,
                    std::slice::from_ref(&event),
                )
                .await?;
            Ok::<(), Error>(())
        }
        .await;
        longest = longest.max(attempt.elapsed());
        match outcome {
            Err(Error::ProjectorIsActivating { ref projector, .. })
                if started.elapsed() + pause <= policy.deadline =>
            {
                // Outside the gate, holding nothing: not part of an attempt.
                // The wait also reads the outcome: a configuration the
                // activation made stale is refused by the wait itself.
                match publisher
                    .wait_out_activation(client, projector, Duration::from_millis(100))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(policy.max_pause);
                    }
                    Err(e) => return (Err(e), longest),
                }
            }
            other => return (other, longest),
        }
    }
}
