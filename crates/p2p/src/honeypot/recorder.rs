//! The store writer: one task that writes sightings to the store, fed by a bounded queue.
//!
//! The swarm never waits for the store: [`Recorder::offer`] queues a sighting or, when the
//! queue is full (the store is down or slower than the arrivals), drops it and counts it. The
//! writer tries a failed write again after a pause that doubles up to a cap, and gives a
//! sighting up (and counts it) once the store has failed to take it for
//! [`Retry::give_up_after`]. So a store outage costs at most a full queue of memory, however
//! long it lasts and however many peers arrive meanwhile.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::{Metrics, Sighting, defaults};

/// Why a sighting could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store will never take this sighting: it is dropped without another try.
    #[error("the store refused the sighting: {0}")]
    Refused(String),
    /// The store failed (unreachable, timed out, an error): the write is tried again.
    #[error("{0}")]
    Failed(String),
}

/// Where the writer puts sightings: the measurement store.
pub trait SightingStore: Send + Sync + 'static {
    /// Writes one sighting.
    fn record(&self, sighting: &Sighting) -> impl Future<Output = Result<(), RecordError>> + Send;
}

/// When a failed write is tried again: a pause of [`Self::first`], doubling with each failure
/// in a row up to [`Self::max`], until the sighting has been failing for
/// [`Self::give_up_after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// The pause after the first failure.
    pub first: Duration,
    /// The longest pause.
    pub max: Duration,
    /// How long a sighting may keep failing before it is given up.
    pub give_up_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            first: defaults::RETRY_FIRST,
            max: defaults::RETRY_MAX,
            give_up_after: defaults::GIVE_UP_AFTER,
        }
    }
}

impl Retry {
    /// The pause before the next try of a sighting that has now failed `failures` times in a
    /// row (1 or more), the first try having started `failing_for` ago; `None`: give it up.
    pub fn after_failure(&self, failures: u32, failing_for: Duration) -> Option<Duration> {
        if failing_for >= self.give_up_after {
            return None;
        }
        let doublings = failures.saturating_sub(1).min(31);
        Some(self.first.saturating_mul(1 << doublings).min(self.max))
    }
}

/// How the writer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderConfig {
    /// Sightings waiting for the store at most.
    pub queue: usize,
    /// When failed writes are tried again.
    pub retry: Retry,
    /// One write that takes longer has failed.
    pub attempt_timeout: Duration,
    /// How long [`Recorder::close`] keeps writing what is queued.
    pub drain_timeout: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            queue: defaults::SIGHTING_QUEUE,
            retry: Retry::default(),
            attempt_timeout: defaults::ATTEMPT_TIMEOUT,
            drain_timeout: defaults::DRAIN_TIMEOUT,
        }
    }
}

/// The handle of the store writer: queues sightings for it. Dropping it stops the writer at
/// once; [`Self::close`] lets it finish first.
#[derive(Debug)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Sighting>>,
    writer: Option<JoinHandle<()>>,
    metrics: Metrics,
    drain_timeout: Duration,
    /// Sightings dropped since the queue last had room (`Some` while it is full).
    dropping: Option<u64>,
}

impl Recorder {
    /// Starts the writer (within a tokio runtime), counting into `metrics`.
    pub fn start(store: impl SightingStore, config: RecorderConfig, metrics: &Metrics) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let writer = tokio::spawn(
            write_all(store, rx, config, metrics.clone())
                .instrument(tracing::info_span!("honeypot_writer")),
        );
        Self {
            tx: Some(tx),
            writer: Some(writer),
            metrics: metrics.clone(),
            drain_timeout: config.drain_timeout,
            dropping: None,
        }
    }

    /// Queues `sighting` for the store; false when the queue is full and it was dropped (and
    /// counted).
    pub fn offer(&mut self, sighting: Sighting) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let reason = match tx.try_send(sighting) {
            Ok(()) => {
                self.metrics.set_queued(tx.max_capacity() - tx.capacity());
                if let Some(dropped) = self.dropping.take() {
                    tracing::warn!(dropped, "the store caught up: queueing sightings again");
                }
                return true;
            }
            Err(mpsc::error::TrySendError::Full(_)) => "queue_full",
            Err(mpsc::error::TrySendError::Closed(_)) => "writer_stopped",
        };
        self.metrics.dropped(reason);
        match &mut self.dropping {
            Some(n) => *n += 1,
            None => {
                tracing::warn!(
                    queued = tx.max_capacity() - tx.capacity(),
                    "the store is behind: dropping new sightings until the queue has room"
                );
                self.dropping = Some(1);
            }
        }
        false
    }

    /// Stops taking sightings and lets the writer write what is queued, for at most the drain
    /// timeout; returns how many were left unwritten (about: the queue's length when it
    /// stopped waiting).
    pub async fn close(mut self) -> usize {
        drop(self.tx.take());
        let Some(mut writer) = self.writer.take() else {
            return 0;
        };
        if tokio::time::timeout(self.drain_timeout, &mut writer)
            .await
            .is_ok()
        {
            return 0;
        }
        writer.abort();
        let _ = writer.await;
        usize::try_from(self.metrics.queued.get()).unwrap_or(0) + 1
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(writer) = &self.writer {
            writer.abort();
        }
    }
}

/// The writer: every queued sighting in turn, until the handle is gone and the queue empty.
async fn write_all(
    store: impl SightingStore,
    mut rx: mpsc::Receiver<Sighting>,
    config: RecorderConfig,
    metrics: Metrics,
) {
    while let Some(sighting) = rx.recv().await {
        metrics.set_queued(rx.len());
        write_one(&store, &sighting, &config, &metrics).await;
    }
}

/// Writes `sighting`, trying again as `config.retry` says.
async fn write_one(
    store: &impl SightingStore,
    sighting: &Sighting,
    config: &RecorderConfig,
    metrics: &Metrics,
) {
    let started = tokio::time::Instant::now();
    let mut failures = 0;
    loop {
        let outcome = tokio::time::timeout(config.attempt_timeout, store.record(sighting))
            .await
            .unwrap_or_else(|_| {
                Err(RecordError::Failed(format!(
                    "no answer within {} s",
                    config.attempt_timeout.as_secs_f64()
                )))
            });
        let error = match outcome {
            Ok(()) => {
                metrics.recorded.inc();
                return;
            }
            Err(RecordError::Refused(error)) => {
                tracing::warn!(peer = %sighting.peer_id, %error, "sighting refused by the store");
                metrics.dropped("refused");
                return;
            }
            Err(RecordError::Failed(error)) => error,
        };
        metrics.record_errors.inc();
        failures += 1;
        let Some(pause) = config.retry.after_failure(failures, started.elapsed()) else {
            tracing::warn!(
                peer = %sighting.peer_id,
                %error,
                failures,
                "giving the sighting up: the store has failed to take it for too long"
            );
            metrics.dropped("gave_up");
            return;
        };
        tracing::warn!(
            peer = %sighting.peer_id,
            %error,
            "recording failed; trying again in {:.1} s",
            pause.as_secs_f64()
        );
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_end_in_giving_up() {
        let r = Retry {
            first: Duration::from_millis(200),
            max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(60),
        };
        let pauses: Vec<u128> = (1..=8)
            .map(|n| {
                r.after_failure(n, Duration::from_secs(1))
                    .expect("pause")
                    .as_millis()
            })
            .collect();
        assert_eq!(pauses, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(
            r.after_failure(u32::MAX, Duration::ZERO),
            Some(Duration::from_secs(5))
        );
        assert_eq!(r.after_failure(3, Duration::from_secs(60)), None);
        assert_eq!(r.after_failure(1, Duration::from_secs(61)), None);
    }

    /// A store that fails while `down` is set and otherwise keeps what it is given.
    #[derive(Clone, Default)]
    struct FakeStore {
        down: Arc<AtomicBool>,
        kept: Arc<Mutex<Vec<String>>>,
    }

    impl SightingStore for FakeStore {
        async fn record(&self, s: &Sighting) -> Result<(), RecordError> {
            if s.peer_id == "poison" {
                return Err(RecordError::Refused("bad address".into()));
            }
            if self.down.load(Ordering::Relaxed) {
                return Err(RecordError::Failed("connection refused".into()));
            }
            self.kept.lock().expect("kept").push(s.peer_id.clone());
            Ok(())
        }
    }

    fn sighting(peer: &str) -> Sighting {
        Sighting {
            peer_id: peer.into(),
            agent_version: String::new(),
            protocols: Vec::new(),
            listen_addrs: Vec::new(),
            relay_addrs: Vec::new(),
            conn_addr: String::new(),
            dcutr: false,
            opened_at: 0,
        }
    }

    /// The value of the metric `natpunch_honeypot_{series}`.
    fn value(registry: &Registry, series: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        let name = format!("natpunch_honeypot_sightings_{series} ");
        let other = format!("natpunch_honeypot_{series} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&name).or_else(|| l.strip_prefix(&other)))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    }

    #[tokio::test]
    async fn a_dead_store_fills_the_queue_then_drops_and_counts_and_recovers() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let store = FakeStore::default();
        store.down.store(true, Ordering::Relaxed);
        let config = RecorderConfig {
            queue: 4,
            retry: Retry {
                first: Duration::from_millis(1),
                max: Duration::from_millis(5),
                give_up_after: Duration::from_millis(200),
            },
            attempt_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(5),
        };
        let mut recorder = Recorder::start(store.clone(), config, &metrics);
        assert!(recorder.offer(sighting("poison")));
        assert!(recorder.offer(sighting("first")));
        // The writer drops the refused one and keeps trying the next; the queue takes four
        // more and drops the rest.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let accepted = (0..100)
            .filter(|i| recorder.offer(sighting(&format!("p{i}"))))
            .count();
        assert_eq!(accepted, 4);
        assert_eq!(
            value(&registry, r#"dropped_total{reason="queue_full"}"#),
            96
        );
        assert_eq!(value(&registry, r#"dropped_total{reason="refused"}"#), 1);
        // The one in the writer's hands is given up after 200 ms of failures.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(value(&registry, r#"dropped_total{reason="gave_up"}"#) >= 1);
        assert!(value(&registry, "record_errors_total") >= 2);
        store.down.store(false, Ordering::Relaxed);
        assert!(recorder.offer(sighting("after")));
        assert_eq!(recorder.close().await, 0, "everything queued is written");
        let kept = store.kept.lock().expect("kept").clone();
        assert_eq!(kept.last().map(String::as_str), Some("after"), "{kept:?}");
        assert!(kept.len() >= 2, "what was queued is written: {kept:?}");
        assert_eq!(value(&registry, "queued"), 0);
    }

    #[tokio::test]
    async fn closing_gives_a_dead_store_no_more_than_the_drain_timeout() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let store = FakeStore::default();
        store.down.store(true, Ordering::Relaxed);
        let config = RecorderConfig {
            drain_timeout: Duration::from_millis(100),
            ..RecorderConfig::default()
        };
        let mut recorder = Recorder::start(store, config, &metrics);
        for i in 0..10 {
            assert!(recorder.offer(sighting(&format!("p{i}"))));
        }
        let started = std::time::Instant::now();
        let left = recorder.close().await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!((9..=11).contains(&left), "{left} left");
    }
}
