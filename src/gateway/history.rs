//! Writes run events to SQL off the hot path (docs/protocol.md §History).
//!
//! Run drivers hand rows to a bounded queue; one task per node batches them
//! into transactions and retries failures with backoff, so delivery never
//! waits on the database (a full queue only slows the run that produces).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{HistoryRow, Store};

/// Rows waiting for the writer, at most.
const QUEUE_CAPACITY: usize = 4096;
/// Rows per transaction, at most.
const BATCH_ROWS: usize = 512;
/// Attempts per batch before it is given up (and counted).
const ATTEMPTS: u32 = 5;

enum Msg {
    Rows(Vec<HistoryRow>),
    Flush(oneshot::Sender<()>),
}

/// Handle on the node's history writer task.
#[derive(Clone)]
pub struct HistoryWriter {
    tx: mpsc::Sender<Msg>,
}

impl HistoryWriter {
    pub fn spawn(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_loop(store, rx));
        HistoryWriter { tx }
    }

    /// Queues rows (waits when the queue is full).
    pub async fn write(&self, rows: Vec<HistoryRow>) {
        if !rows.is_empty() && self.tx.send(Msg::Rows(rows)).await.is_err() {
            tracing::error!("history writer is gone; rows dropped");
        }
    }

    /// Waits until everything queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<HistoryRow> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Rows(rows) => batch.extend(rows),
                Msg::Flush(done) => flushes.push(done),
            }
            if batch.len() >= BATCH_ROWS {
                break;
            }
            next = rx.try_recv().ok();
        }
        write_with_retry(&store, &batch).await;
        batch.clear();
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_with_retry(store: &Store, rows: &[HistoryRow]) {
    if rows.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        match store.append_history(rows).await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("chatgate_backend_errors_total", "backend" => "database").increment(1);
                tracing::warn!(attempt, error = %e, rows = rows.len(), "history write failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(rows = rows.len(), "history rows dropped after retries");
}
