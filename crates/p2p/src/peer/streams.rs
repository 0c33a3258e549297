//! The handshake streams' I/O, owned by the peer: one task per stream writes what the engine
//! sends and reads what the remote sends, and hands each event to the event loop.
//!
//! A task ends when its stream breaks, or once it wrote what the engine sent before dropping
//! the stream (a SYNC must go out even when the dial follows at once), or after
//! [`WRITE_TIMEOUT`] on a write; the peer aborts the tasks left when it is dropped. It reads only the messages the protocol
//! has for its end (one reply for the driver, CONNECT and SYNC for the answerer, and over
//! `/natpunch/dcutr/1.1.0` a birthday-probing HIT and a port prediction's NEXT more), so a
//! remote cannot make it read
//! more. The channel to the event loop is bounded; a task waits when it
//! is full rather than drop an event, since a lost event would leave its engine waiting for
//! its timeout. Events of a stream dropped meanwhile are discarded by [`Streams::next`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::AsyncReadExt as _;
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::Instrument as _;

use super::defaults::MAX_SESSIONS;
use crate::punch::{Handshake, StreamId};
use crate::wire::{self, HolePunch};

/// The longest opening a stream, or one write, may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on a stream.
#[derive(Debug)]
pub(super) enum StreamEvent {
    /// It is open: writes may go out.
    Opened,
    /// A message came in.
    Message(HolePunch),
    /// It failed to open or broke (`unsupported`: the remote does not speak its protocol).
    Failed { error: String, unsupported: bool },
}

/// One stream's task.
#[derive(Debug)]
struct Entry {
    /// Tells its events from those of a stream of the same name in an earlier session.
    generation: u64,
    out: mpsc::Sender<HolePunch>,
    /// Messages sent and not yet written.
    unwritten: Arc<AtomicUsize>,
    task: AbortHandle,
}

type Tagged = (PeerId, StreamId, u64, StreamEvent);

/// The handshake streams of every session.
#[derive(Debug)]
pub(super) struct Streams {
    by_key: HashMap<(PeerId, StreamId), Entry>,
    /// Tasks of dropped streams still writing their last messages.
    closing: Vec<AbortHandle>,
    next_generation: u64,
    events_tx: mpsc::Sender<Tagged>,
    events: mpsc::Receiver<Tagged>,
}

impl Default for Streams {
    fn default() -> Self {
        let (events_tx, events) = mpsc::channel(2 * MAX_SESSIONS);
        Self {
            by_key: HashMap::new(),
            closing: Vec::new(),
            next_generation: 0,
            events_tx,
            events,
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for entry in self.by_key.values() {
            entry.task.abort();
        }
        for task in &self.closing {
            task.abort();
        }
    }
}

impl Streams {
    /// Opens a stream of `handshake` to `peer` and runs it.
    pub(super) fn open(
        &mut self,
        mut control: libp2p_stream::Control,
        peer: PeerId,
        id: StreamId,
        handshake: Handshake,
    ) {
        self.spawn(peer, id, |events, out| async move {
            let opening = control.open_stream(peer, handshake.protocol());
            let failed = match tokio::time::timeout(WRITE_TIMEOUT, opening).await {
                Ok(Ok(stream)) => {
                    if events.send(StreamEvent::Opened).await.is_ok() {
                        run(stream, reads(handshake, 1), out, events).await;
                    }
                    return;
                }
                Ok(Err(e)) => StreamEvent::Failed {
                    unsupported: matches!(
                        e,
                        libp2p_stream::OpenStreamError::UnsupportedProtocol(_)
                    ),
                    error: e.to_string(),
                },
                Err(_) => StreamEvent::Failed {
                    error: format!("opening the stream took over {WRITE_TIMEOUT:?}"),
                    unsupported: false,
                },
            };
            let _ = events.send(failed).await;
        });
    }

    /// Runs a stream of `handshake` the remote opened.
    pub(super) fn accept(
        &mut self,
        peer: PeerId,
        id: StreamId,
        stream: libp2p::Stream,
        handshake: Handshake,
    ) {
        self.spawn(peer, id, |events, out| {
            run(stream, reads(handshake, 2), out, events)
        });
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(
        &mut self,
        peer: PeerId,
        id: StreamId,
        task: impl FnOnce(Events, Outbox) -> F,
    ) {
        self.close(peer, id);
        self.next_generation += 1;
        let generation = self.next_generation;
        // The engine sends at most four messages on a stream (CONNECT, SYNC, NEXT, HIT).
        let (out, out_rx) = mpsc::channel(4);
        let unwritten = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox {
            messages: out_rx,
            unwritten: Arc::clone(&unwritten),
        };
        let events = Events {
            tx: self.events_tx.clone(),
            peer,
            id,
            generation,
        };
        let span = tracing::debug_span!("handshake", %peer, ?id);
        let task = tokio::spawn(task(events, outbox).instrument(span)).abort_handle();
        self.by_key.insert(
            (peer, id),
            Entry {
                generation,
                out,
                unwritten,
                task,
            },
        );
    }

    /// Writes `message` on the stream.
    pub(super) fn send(&mut self, peer: PeerId, id: StreamId, message: HolePunch) {
        let Some(entry) = self.by_key.get(&(peer, id)) else {
            return;
        };
        if entry.out.try_send(message).is_ok() {
            entry.unwritten.fetch_add(1, Ordering::SeqCst);
        } else {
            tracing::debug!(%peer, ?id, "a message for a stream that is over or full");
        }
    }

    /// Drops the stream once what was sent on it is written; its events are not reported.
    pub(super) fn close(&mut self, peer: PeerId, id: StreamId) {
        let Some(entry) = self.by_key.remove(&(peer, id)) else {
            return;
        };
        if entry.unwritten.load(Ordering::SeqCst) == 0 {
            entry.task.abort();
            return;
        }
        self.closing.retain(|t| !t.is_finished());
        // Its sender goes with `entry`: the task writes what is queued and ends.
        self.closing.push(entry.task);
    }

    /// Drops every stream of `peer` (its session ended).
    pub(super) fn cancel(&mut self, peer: PeerId) {
        let ids: Vec<StreamId> = self
            .by_key
            .keys()
            .filter(|(p, _)| *p == peer)
            .map(|(_, id)| *id)
            .collect();
        for id in ids {
            self.close(peer, id);
        }
    }

    /// The next event of a stream still in use; pending while there is none. Cancel-safe.
    pub(super) async fn next(&mut self) -> (PeerId, StreamId, StreamEvent) {
        loop {
            let Some((peer, id, generation, event)) = self.events.recv().await else {
                // `events_tx` lives in `self`: the channel never closes.
                return std::future::pending().await;
            };
            if self
                .by_key
                .get(&(peer, id))
                .is_some_and(|e| e.generation == generation)
            {
                return (peer, id, event);
            }
        }
    }

    /// Stream tasks alive: in use, or writing their last messages.
    pub(super) fn len(&self) -> usize {
        self.by_key.len() + self.closing.iter().filter(|t| !t.is_finished()).count()
    }
}

/// What a task is to write.
struct Outbox {
    messages: mpsc::Receiver<HolePunch>,
    unwritten: Arc<AtomicUsize>,
}

/// A task's way to the event loop.
struct Events {
    tx: mpsc::Sender<Tagged>,
    peer: PeerId,
    id: StreamId,
    generation: u64,
}

impl Events {
    async fn send(&self, event: StreamEvent) -> Result<(), ()> {
        self.tx
            .send((self.peer, self.id, self.generation, event))
            .await
            .map_err(|_| ())
    }
}

/// The messages an end of a `handshake` stream reads: the handshake's `messages`, and over
/// 1.1.0 a birthday-probing HIT and a port prediction's NEXT.
fn reads(handshake: Handshake, messages: usize) -> usize {
    messages + 2 * usize::from(handshake == Handshake::NatpunchClasses)
}

/// Writes what comes on `out` and reads `reads` messages, until the stream breaks or `out`
/// closes.
async fn run(stream: libp2p::Stream, reads: usize, mut out: Outbox, events: Events) {
    let (mut r, mut w) = stream.split();
    let reader = async {
        for _ in 0..reads {
            let event = match wire::read_message(&mut r).await {
                Ok(m) => StreamEvent::Message(m),
                Err(e) => failure(&e),
            };
            let failed = matches!(event, StreamEvent::Failed { .. });
            if events.send(event).await.is_err() || failed {
                return;
            }
        }
        std::future::pending().await
    };
    let writer = async {
        while let Some(message) = out.messages.recv().await {
            let written =
                tokio::time::timeout(WRITE_TIMEOUT, wire::write_message(&mut w, &message));
            let error = match written.await {
                Ok(Ok(())) => {
                    out.unwritten.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "writing timed out"),
            };
            let _ = events.send(failure(&error)).await;
            return;
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

/// A read or write error as an event. With optimistic negotiation a remote without the
/// protocol shows up on the first read, as multistream-select's "negotiation failed".
fn failure(e: &std::io::Error) -> StreamEvent {
    use libp2p::core::upgrade::NegotiationError;
    let unsupported = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<NegotiationError>())
        .is_some_and(|n| matches!(n, NegotiationError::Failed));
    StreamEvent::Failed {
        error: e.to_string(),
        unsupported,
    }
}
