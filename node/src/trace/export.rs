//! Batched span export on the node's runtime: a bounded queue between the data path and one
//! export task.
//!
//! Why not the SDK's `BatchSpanProcessor`: it runs a thread per provider, blocks it on each
//! export, and keeps its drop count private. Here the data path's only cost is a `try_send`
//! when a span ends; a full queue drops the span and counts it
//! (`meshnode_trace_spans_dropped_total`), as does a batch the collector did not take. One
//! export is in flight at a time, so a slow or unreachable collector costs at most the queue's
//! memory, never a wait on the data path.

use std::time::Duration;

use ::metrics::Counter;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Spans waiting for export; past this they are dropped and counted. 2,048 is the
/// OpenTelemetry default: at 1,000 spans/s about two seconds of a collector's hiccup.
pub const QUEUE: usize = 2048;
/// Spans per export request (the OpenTelemetry default, 512): a few hundred KiB of protobuf.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits in the queue before its batch is sent: traces show up within about a
/// second, and a quiet node still sends what it has.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one export request, its retries included: an export slower than this is
/// abandoned and its spans counted as dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The provider's span processor: hands each ended, sampled span to the export task.
#[derive(Debug)]
pub(super) struct Queue {
    spans: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.spans.try_send(span).is_err() {
            self.dropped.increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Asks the export task to send everything queued so far; answered once it has.
pub(super) type FlushRequest = oneshot::Sender<()>;

/// The queue, and the export task's ends of it.
pub(super) fn queue(dropped: Counter) -> (Queue, mpsc::Receiver<SpanData>) {
    let (spans, rx) = mpsc::channel(QUEUE);
    (Queue { spans, dropped }, rx)
}

/// The export task: batches of up to [`MAX_BATCH`], sent when full or `interval` (the node
/// uses [`INTERVAL`]) after the first span of the batch arrived, or at once when a flush is
/// asked for. Ends when every sender is gone (the provider was dropped), after sending what
/// was left.
pub(super) async fn run<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<FlushRequest>,
    dropped: Counter,
    interval: Duration,
) {
    let mut sender = Sender {
        exporter,
        dropped,
        failing: false,
    };
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut due: Option<Instant> = None;
    let mut flushes_open = true;
    loop {
        // Never 0: a full batch is sent before the loop comes back here.
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            n = spans.recv_many(&mut batch, room) => {
                if n == 0 {
                    sender.send(std::mem::take(&mut batch)).await;
                    return;
                }
                due.get_or_insert_with(|| Instant::now() + interval);
                if batch.len() < MAX_BATCH {
                    continue;
                }
            }
            () = sleep_until(due), if due.is_some() => {}
            ack = flushes.recv(), if flushes_open => {
                let Some(ack) = ack else {
                    flushes_open = false;
                    continue;
                };
                // Everything queued before the request: whole batches, then the rest.
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                    if batch.len() == MAX_BATCH {
                        sender.send(std::mem::take(&mut batch)).await;
                    }
                }
                sender.send(std::mem::take(&mut batch)).await;
                due = None;
                let _ = ack.send(());
                continue;
            }
        }
        sender.send(std::mem::take(&mut batch)).await;
        batch.reserve(MAX_BATCH);
        due = None;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Sender<E> {
    exporter: E,
    dropped: Counter,
    /// The last export failed: log the next failure at debug, the recovery at info.
    failing: bool,
}

impl<E: SpanExporter> Sender<E> {
    /// Sends one batch; a batch not taken in time is counted as dropped.
    async fn send(&mut self, batch: Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let result = tokio::time::timeout(EXPORT_TIMEOUT, self.exporter.export(batch)).await;
        let error = match result {
            Ok(Ok(())) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("span export works again");
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {EXPORT_TIMEOUT:?}"),
        };
        self.dropped.increment(n);
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(spans = n, %error, "span export failed; spans dropped");
        } else {
            tracing::warn!(spans = n, %error, "span export failed; spans dropped until the collector takes them");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::metrics::Metrics;

    /// An exporter that records batch sizes and fails while `fail` is set.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<usize>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "500".into(),
                ));
            }
            self.batches.lock().expect("lock").push(batch.len());
            Ok(())
        }
    }

    fn span() -> SpanData {
        use opentelemetry::trace::{SpanContext, SpanKind, Status};
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "t".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[tokio::test]
    async fn batches_by_size_and_time_and_counts_what_is_lost() {
        let interval = Duration::from_millis(50);
        let m = Metrics::new();
        let dropped = m.counter("meshnode_trace_spans_dropped_total", &[]);
        let (q, rx) = queue(dropped.clone());
        let (flush_tx, flush_rx) = mpsc::channel(1);
        let rec = Recorder::default();
        let task = tokio::spawn(run(rec.clone(), rx, flush_rx, dropped, interval));
        for _ in 0..MAX_BATCH + 3 {
            q.on_end(span());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*rec.batches.lock().expect("lock"), [MAX_BATCH]);
        tokio::time::sleep(interval * 3).await;
        assert_eq!(*rec.batches.lock().expect("lock"), [MAX_BATCH, 3]);

        // A failing collector: the batch is counted as dropped.
        rec.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        q.on_end(span());
        q.on_end(span());
        let (ack, done) = oneshot::channel();
        flush_tx.send(ack).await.expect("task");
        done.await.expect("flushed");
        assert_eq!(m.get("meshnode_trace_spans_dropped_total", &[]), 2.0);

        // Past the queue's bound, spans are dropped at once (the task does not run during this loop).
        for _ in 0..QUEUE + 5 {
            q.on_end(span());
        }
        assert_eq!(m.get("meshnode_trace_spans_dropped_total", &[]), 7.0);
        rec.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        drop(q);
        task.await.expect("task ends once the queue is gone");
        let sent: usize = rec.batches.lock().expect("lock").iter().sum();
        assert_eq!(sent, MAX_BATCH + 3 + QUEUE);
    }
}
