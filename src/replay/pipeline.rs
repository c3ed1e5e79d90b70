//! The read side of a pass: a reader task fetches batches of events on a
//! connection of its own (binary `COPY`, [`PassQuery::read_copy`]) and a
//! decoder thread turns them into [`EventBatch`]es, while the pass applies
//! the previous batch. Reads only; the pass decides what is applied.

use std::time::Instant;

use deadpool_postgres::Object;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::event_store::{EventBatch, PassQuery};
use crate::replay::retry::{grouped, StepError};
use crate::{Error, Result};

/// Starts reading the events of `query` after `cursor` on `reader`, in
/// batches of at most `max_limit` events, decoding them (their payload only
/// when `payload`) on a thread of their own. The receiver yields the
/// batches in order and then an empty batch, which ends the pass; it ends
/// early (without the empty batch) after an error, which names the read
/// (`replay read after position 81,220`), or when `cancel` fires.
///
/// Three stages overlap: the reader fetches batch n+2 (server), the decoder
/// turns batch n+1 into events (client CPU), and the caller applies batch n
/// (server).
///
/// # Errors
/// [`Error::Failed`] when the decoder thread cannot start.
pub(super) fn read_batches(
    reader: Object,
    query: PassQuery,
    cursor: i64,
    max_limit: i64,
    payload: bool,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<Result<EventBatch, StepError>>> {
    let (row_sender, row_receiver) = mpsc::channel::<Result<Vec<u8>, StepError>>(1);
    let (sender, receiver) = mpsc::channel::<Result<EventBatch, StepError>>(1);
    tokio::spawn(read(reader, query, cursor, max_limit, cancel, row_sender));
    // One thread decodes every batch of the pass: with a blocking-pool
    // thread per batch, the allocator kept an arena per thread and memory
    // grew with the number of batches (decision 0017).
    std::thread::Builder::new()
        .name("coord-decode".into())
        .spawn(move || decode(row_receiver, sender, payload))
        .map_err(|e| Error::Failed(format!("cannot start the event decoder: {e}")))?;
    Ok(receiver)
}

/// The reader task: `COPY` data of each batch, until an empty read, an
/// error, cancellation, or the receiver going away.
async fn read(
    reader: Object,
    query: PassQuery,
    mut cursor: i64,
    max_limit: i64,
    cancel: CancellationToken,
    sender: mpsc::Sender<Result<Vec<u8>, StepError>>,
) {
    let mut limit = max_limit;
    while !cancel.is_cancelled() {
        let read_started = Instant::now();
        let result = query.read_copy(&reader, cursor, limit).await;
        // The pass ends with an empty read: a short batch may have been
        // cut by the byte budget.
        let (result, last) = match result {
            Ok((data, rows, last_position)) => {
                debug!(
                    read_ms = read_started.elapsed().as_millis() as u64,
                    rows,
                    bytes = data.len(),
                    "read batch"
                );
                if let Some(position) = last_position {
                    cursor = position;
                }
                limit = next_limit(limit, rows as i64, max_limit);
                (Ok(data), rows == 0)
            }
            Err(e) => {
                let step = format!("replay read after position {}", grouped(cursor));
                (Err(StepError::new(step, e)), true)
            }
        };
        if sender.send(result).await.is_err() || last {
            break;
        }
    }
}

/// The decoder thread.
fn decode(
    mut receiver: mpsc::Receiver<Result<Vec<u8>, StepError>>,
    sender: mpsc::Sender<Result<EventBatch, StepError>>,
    payload: bool,
) {
    while let Some(data) = receiver.blocking_recv() {
        let decoded = data.and_then(|data| {
            EventBatch::decode_copy_with(&data, payload)
                .map_err(|e| StepError::new("replay decode of a batch", e))
        });
        if sender.blocking_send(decoded).is_err() {
            break;
        }
    }
}

/// The event limit of the reader's next batch: after a batch the byte
/// budget cut short, a quarter more events than it held (so the server
/// reads few events only to drop them); after a full one, twice as many,
/// up to `max`.
fn next_limit(limit: i64, rows: i64, max: i64) -> i64 {
    if rows == 0 {
        limit
    } else if rows < limit {
        (rows + rows / 4 + 1).min(max)
    } else {
        limit.saturating_mul(2).min(max)
    }
}
