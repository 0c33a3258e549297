//! The handshake tasks, owned by the peer: per remote at most one that this peer drives (it
//! opened the stream) and one that answers the remote's stream, aborted when a newer one of the
//! same kind replaces it, when the session ends, or when the peer is dropped.
//!
//! Each task ends in exactly one [`Step`], which the event loop takes from the task's handle
//! ([`Handshakes::next`]). There is no channel to fill: what waits to be read is bounded by the
//! tasks, two per session at most ([`super::defaults::MAX_SESSIONS`]). Nothing may be
//! dropped either: a session whose step was lost would stay "handshaking" and never end.

use std::collections::HashMap;

use libp2p::PeerId;
use tokio::task::{AbortHandle, Id, JoinSet};
use tracing::Instrument as _;

use super::Step;

/// Which end of the handshake stream this peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Role {
    /// It opened the stream and sends CONNECT.
    Driving,
    /// The remote opened the stream; this peer answers.
    Answering,
}

#[derive(Debug, Default)]
pub(super) struct Handshakes {
    tasks: JoinSet<Step>,
    /// The task that counts for each remote and role.
    by_key: HashMap<(PeerId, Role), AbortHandle>,
    by_task: HashMap<Id, (PeerId, Role)>,
}

impl Handshakes {
    /// Runs `handshake` for `peer` in `role`; one already running for both is aborted and its
    /// step never reported (a stream replaced by a newer one is over).
    pub(super) fn spawn(
        &mut self,
        peer: PeerId,
        role: Role,
        handshake: impl Future<Output = Step> + Send + 'static,
    ) {
        self.abort((peer, role));
        let span = tracing::debug_span!("handshake", %peer, ?role);
        let handle = self.tasks.spawn(handshake.instrument(span));
        self.by_task.insert(handle.id(), (peer, role));
        self.by_key.insert((peer, role), handle);
    }

    /// Aborts the handshakes for `peer`, if any run (its session ended).
    pub(super) fn cancel(&mut self, peer: PeerId) {
        self.abort((peer, Role::Driving));
        self.abort((peer, Role::Answering));
    }

    fn abort(&mut self, key: (PeerId, Role)) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_task.remove(&old.id());
            old.abort();
        }
    }

    /// The next handshake's step; pending while none is running. Cancel-safe.
    pub(super) async fn next(&mut self) -> Step {
        loop {
            let Some(done) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, result) = match done {
                Ok((id, step)) => (id, Ok(step)),
                Err(e) => (e.id(), Err(e)),
            };
            // A replaced or cancelled task: its step no longer counts.
            let Some((peer, role)) = self.by_task.remove(&id) else {
                continue;
            };
            self.by_key.remove(&(peer, role));
            return match result {
                Ok(step) => step,
                Err(e) => Step::Failed {
                    peer,
                    error: format!("the handshake task ended: {e}"),
                    timeout: false,
                    unsupported: false,
                },
            };
        }
    }

    /// Handshakes running.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use std::sync::Arc;
    use std::time::Duration;

    fn failed(peer: PeerId, error: &str) -> Step {
        Step::Failed {
            peer,
            error: error.into(),
            timeout: false,
            unsupported: false,
        }
    }

    fn error_of(step: &Step) -> &str {
        match step {
            Step::Failed { error, .. } => error,
            Step::Dial { .. } => "dial",
        }
    }

    #[tokio::test]
    async fn a_newer_handshake_replaces_the_older_and_dropping_aborts_them() {
        let mut h = Handshakes::default();
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        // Held by each task while it runs: its strong count tells how many still run.
        let alive = Arc::new(());
        let forever = |alive: Arc<()>, step: Step| async move {
            let _alive = alive;
            std::future::pending::<()>().await;
            step
        };
        h.spawn(
            peer,
            Role::Answering,
            forever(alive.clone(), failed(peer, "old")),
        );
        h.spawn(peer, Role::Answering, async move { failed(peer, "new") });
        h.spawn(
            other,
            Role::Driving,
            forever(alive.clone(), failed(other, "never")),
        );
        assert_eq!(h.len(), 2, "one per remote and role");
        let step = tokio::time::timeout(Duration::from_secs(5), h.next())
            .await
            .expect("a step");
        assert_eq!(error_of(&step), "new", "only the newest counts");
        assert_eq!(h.len(), 1);
        tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::strong_count(&alive) > 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the replaced task was aborted");
        h.cancel(other);
        assert_eq!(h.len(), 0);
        h.spawn(
            other,
            Role::Driving,
            forever(alive.clone(), failed(other, "never")),
        );
        h.spawn(
            other,
            Role::Answering,
            forever(alive.clone(), failed(other, "never")),
        );
        assert_eq!(
            h.len(),
            2,
            "a driving and an answering handshake run side by side"
        );
        drop(h);
        tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::strong_count(&alive) > 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("dropping the peer's handshakes aborts them");
    }

    #[tokio::test]
    async fn a_handshake_that_panics_still_ends_its_handshake() {
        let mut h = Handshakes::default();
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        h.spawn(peer, Role::Driving, async move { panic!("boom") });
        let step = tokio::time::timeout(Duration::from_secs(5), h.next())
            .await
            .expect("a step");
        assert!(matches!(step, Step::Failed { peer: p, .. } if p == peer));
        assert!(error_of(&step).contains("panic"), "{}", error_of(&step));
        assert_eq!(h.len(), 0);
    }
}
