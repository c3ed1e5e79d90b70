//! The read side of a pass: a reader task fetches batches of events on a
//! connection of its own (binary `COPY`, [`PassQuery::read_copy`]) and a
//! decoder thread turns them into [`EventBatch`]es, while the pass applies
//! the previous batch, and frees each batch once the pass gives it back.
//! Reads only; the pass decides what is applied.

use std::time::Instant;

use deadpool_postgres::Object;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::event_store::{Event, EventBatch, PassQuery, Payload};
use crate::replay::retry::{grouped, StepError};
use crate::{Error, Result};

/// Starts reading the events of `query` after `cursor` on `reader`, in
/// batches of at most `max_limit` events, decoding them (of their payload
/// what `payload` says) on a thread of their own. The receiver yields the
/// batches in order and then an empty batch, which ends the pass; it ends
/// early (without the empty batch) after an error, which names the read
/// (`replay read after position 81,220`), or when `cancel` fires.
///
/// Three stages overlap: the reader fetches batch n+2 (server), the decoder
/// turns batch n+1 into events (client CPU), and the caller applies batch n
/// (server). The decoder starts on batch n+1 only once the caller has
/// taken batch n, so at most two decoded batches are alive, and the `COPY`
/// buffers go back to the reader (decision 0075). The caller gives each
/// applied batch back ([`Batches::done`]): the decoder thread, which
/// allocated its events, frees them (decision 0079).
///
/// # Errors
/// [`Error::Failed`] when the decoder thread cannot start.
pub(super) fn read_batches(
    reader: Object,
    query: PassQuery,
    cursor: i64,
    max_limit: i64,
    payload: Payload,
    cancel: CancellationToken,
) -> Result<Batches> {
    let (row_sender, row_receiver) = mpsc::channel::<Read>(1);
    let (sender, receiver) = mpsc::channel::<Result<EventBatch, StepError>>(1);
    let (spent_sender, spent_receiver) = mpsc::unbounded_channel::<Vec<Event>>();
    // The decoder gives each buffer back to the reader once decoded: a pass
    // allocates its few `COPY` buffers once, at their largest, instead of
    // growing a new one for every batch (decision 0075).
    let (free_sender, free_receiver) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(read(
        reader,
        query,
        cursor,
        max_limit,
        cancel,
        row_sender,
        free_receiver,
    ));
    // One thread decodes every batch of the pass: with a blocking-pool
    // thread per batch, the allocator kept an arena per thread and memory
    // grew with the number of batches (decision 0017).
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("coord-decode".into())
        .spawn(move || {
            decode(
                &runtime,
                row_receiver,
                sender,
                payload,
                free_sender,
                spent_receiver,
            );
        })
        .map_err(|e| Error::Failed(format!("cannot start the event decoder: {e}")))?;
    Ok(Batches {
        receiver,
        spent: spent_sender,
    })
}

/// The decoded batches of a pass, in order ([`read_batches`]).
pub(super) struct Batches {
    receiver: mpsc::Receiver<Result<EventBatch, StepError>>,
    spent: mpsc::UnboundedSender<Vec<Event>>,
}

impl Batches {
    /// The next batch; `None` once the read side has stopped.
    pub(super) async fn recv(&mut self) -> Option<Result<EventBatch, StepError>> {
        self.receiver.recv().await
    }

    /// Gives the events of an applied batch back to the decoder thread,
    /// which frees them before it decodes the next batch: freeing 50,000
    /// events (a few allocations each) took the applying task tens of
    /// milliseconds, more across threads (the events come from the
    /// decoder thread's arena), and the next decoding reuses the memory.
    /// The pass gives them back before it writes and commits the batch's
    /// checkpoint, while the decoder waits for room for the next batch.
    pub(super) fn done(&self, events: Vec<Event>) {
        // The decoder may be gone (the pass ended): they are freed here.
        let _ = self.spent.send(events);
    }
}

/// The `COPY` data of a batch and its row count.
type Read = Result<(Vec<u8>, usize), StepError>;

/// The reader task: `COPY` data of each batch, until an empty read, an
/// error, cancellation, or the receiver going away; each into a buffer the
/// decoder gave back, when there is one.
async fn read(
    reader: Object,
    query: PassQuery,
    mut cursor: i64,
    max_limit: i64,
    cancel: CancellationToken,
    sender: mpsc::Sender<Read>,
    mut free: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut limit = max_limit;
    while !cancel.is_cancelled() {
        let read_started = Instant::now();
        let mut data = free.try_recv().unwrap_or_default();
        let result = query
            .read_copy_into(&reader, cursor, limit, &mut data)
            .await;
        // The pass ends with an empty read: a short batch may have been
        // cut by the byte budget.
        let (result, last) = match result {
            Ok((rows, last_position)) => {
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
                (Ok((data, rows)), rows == 0)
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

/// The decoder thread; gives each buffer back to the reader once decoded,
/// and frees the events the pass gives back while it waits for room. It
/// decodes a batch only once the pass has taken the one before, so at most
/// two decoded batches are alive: the one applied and the next (with a
/// batch waiting in the channel too, peak memory held three).
fn decode(
    runtime: &tokio::runtime::Handle,
    mut receiver: mpsc::Receiver<Read>,
    sender: mpsc::Sender<Result<EventBatch, StepError>>,
    payload: Payload,
    free: mpsc::UnboundedSender<Vec<u8>>,
    mut spent: mpsc::UnboundedReceiver<Vec<Event>>,
) {
    // Room for the next batch first: the pass has taken the one before.
    // Meanwhile the events the pass gives back are freed: those of the
    // batch it applies, given back before its checkpoint is committed.
    loop {
        let room = runtime.block_on(async {
            loop {
                tokio::select! {
                    biased;
                    Some(events) = spent.recv() => drop(events),
                    room = sender.reserve() => break room,
                }
            }
        });
        let Ok(room) = room else {
            break;
        };
        let Some(read) = receiver.blocking_recv() else {
            break;
        };
        let decoded = read.and_then(|(data, rows)| {
            let started = Instant::now();
            let batch = EventBatch::decode_copy_payload(&data, rows, &payload)
                .map_err(|e| StepError::new("replay decode of a batch", e));
            debug!(
                decode_ms = started.elapsed().as_millis() as u64,
                rows, "decoded batch"
            );
            // The reader may be gone (the pass ended): the buffer is freed.
            let _ = free.send(data);
            batch
        });
        room.send(decoded);
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
