//! Link delay, jitter and loss without `sch_netem`: an NFQUEUE delay line per node.
//!
//! The kernels natpunch runs on are often built without netem. A delay line works everywhere
//! NFQUEUE does: iptables rules in the node's `raw` table (which runs before conntrack, so NAT
//! only ever sees delayed packets) queue the packets of its uplink to a thread that holds each one
//! for the link's delay and then lets it go. Both directions of the uplink are delayed:
//!
//! * down (towards the node): packets arriving on the uplink interface (`PREROUTING -i`);
//! * up (away from the node): packets the node sends out of the uplink (`OUTPUT -o`) and, on a
//!   router, packets arriving from the LAN that are not addressed to the router itself
//!   (`PREROUTING -i lan ! --dst-type LOCAL`): these are the ones it forwards upstream, while
//!   hairpinned packets (addressed to the router's WAN address) never cross the uplink.
//!
//! Jitter draws each packet's delay uniformly from `delay ± jitter` but never lets a packet
//! overtake the one before it (a real link does not reorder). Loss drops a packet with the given
//! probability. Randomness comes from a seeded generator, so a run can be repeated.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nfq::{Queue, Verdict};

use crate::defaults;
use crate::netns;
use crate::queue::{QueueWorker, StartError, Worker};
use crate::topology::{LAN_BRIDGE, LinkCondition, NodePlan};

/// Queue number of the downstream direction (towards the node).
const QUEUE_DOWN: u16 = 0;
/// Queue number of the upstream direction (away from the node).
const QUEUE_UP: u16 = 1;
/// How long the thread sleeps at most when it holds nothing due earlier; also the delay line's
/// resolution (nfq exposes no file descriptor to wait on).
const IDLE_TICK: Duration = Duration::from_millis(1);

/// The iptables rules (arguments after `iptables -t raw`) that feed a node's delay line.
pub fn rules(node: &NodePlan) -> Vec<Vec<String>> {
    let up_if = node.uplink.iface.as_str();
    let queue = |q: u16| {
        ["-j", "NFQUEUE", "--queue-num"]
            .map(str::to_owned)
            .into_iter()
            .chain([q.to_string()])
    };
    let mut rules: Vec<Vec<String>> = Vec::new();
    let rule = |spec: &[&str], q| {
        spec.iter()
            .map(|s| (*s).to_owned())
            .chain(queue(q))
            .collect()
    };
    rules.push(rule(&["-A", "PREROUTING", "-i", up_if], QUEUE_DOWN));
    rules.push(rule(&["-A", "OUTPUT", "-o", up_if], QUEUE_UP));
    if node.is_router() {
        rules.push(rule(
            &[
                "-A",
                "PREROUTING",
                "-i",
                LAN_BRIDGE,
                "-m",
                "addrtype",
                "!",
                "--dst-type",
                "LOCAL",
            ],
            QUEUE_UP,
        ));
    }
    rules
}

/// A running delay line for one node's uplink. Dropping it stops the thread, releases every held
/// packet and removes the iptables rules.
#[derive(Debug)]
pub struct DelayLine {
    _worker: QueueWorker,
}

/// A delay line that could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DelayError {
    /// The queue could not be opened or bound (is NFQUEUE available? is another line bound?).
    #[error("delay line in {netns}: nfqueue")]
    Queue {
        /// The namespace.
        netns: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The iptables rules could not be installed.
    #[error("delay line in {netns}")]
    Rules {
        /// The namespace.
        netns: String,
        /// The failed command.
        #[source]
        source: netns::CommandError,
    },
}

impl DelayLine {
    /// Starts the delay line of `node` with the node's link condition and `seed`.
    pub fn start(node: &NodePlan, seed: u64) -> Result<Self, DelayError> {
        let cond = node.link;
        let worker = QueueWorker::start(Worker {
            netns: node.netns.clone(),
            thread: format!("delay {}", node.name),
            what: "delay line",
            table: "raw",
            rules: rules(node),
            flush: &["-w", "-t", "raw", "-F"],
            body: move |stop: &AtomicBool, ready: &mpsc::SyncSender<io::Result<()>>| {
                let result = run(cond, seed, stop, ready);
                if let Err(e) = &result {
                    // Fail open: without this thread the queue would drop every packet of the
                    // link. The child process inherits this thread's namespace.
                    tracing::error!("delay line failed: {e}; its rules are removed, the link is no longer delayed");
                    let _ = std::process::Command::new("iptables").args(["-w", "-t", "raw", "-F"]).status();
                }
                result
            },
        })
        .map_err(|e| match e {
            StartError::Queue(source) => DelayError::Queue {
                netns: node.netns.clone(),
                source,
            },
            StartError::Rules(source) => DelayError::Rules {
                netns: node.netns.clone(),
                source,
            },
        })?;
        Ok(Self { _worker: worker })
    }
}

/// SplitMix64: a tiny, seedable generator; quality is ample for jitter and loss.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The schedule of one direction: decides each packet's fate and release time (sans-IO).
#[derive(Debug)]
pub(crate) struct Schedule {
    cond: LinkCondition,
    rng: SplitMix64,
    last_release: Option<Instant>,
}

impl Schedule {
    pub(crate) fn new(cond: LinkCondition, seed: u64) -> Self {
        Self {
            cond,
            rng: SplitMix64::new(seed),
            last_release: None,
        }
    }

    /// When a packet that arrived at `now` may leave, or `None` if it is lost.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<Instant> {
        if self.cond.loss_pct > 0.0 && self.rng.next_f64() * 100.0 < self.cond.loss_pct {
            return None;
        }
        let jitter = f64::from(self.cond.jitter_ms) * (2.0 * self.rng.next_f64() - 1.0);
        let delay_ms = (f64::from(self.cond.delay_ms) + jitter).max(0.0);
        let mut release = now + Duration::from_secs_f64(delay_ms / 1000.0);
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        Some(release)
    }
}

fn run(
    cond: LinkCondition,
    seed: u64,
    stop: &AtomicBool,
    ready: &mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    let setup = || -> io::Result<Queue> {
        let mut q = Queue::open()?;
        for num in [QUEUE_DOWN, QUEUE_UP] {
            q.bind(num)?;
            q.set_copy_range(num, 0)?;
            q.set_queue_max_len(num, defaults::DELAY_QUEUE_MAX_LEN)?;
        }
        q.set_nonblocking(true);
        Ok(q)
    };
    let mut q = crate::queue::open(ready, setup)?;
    let mut schedules = [
        Schedule::new(cond, seed),
        Schedule::new(cond, seed ^ 0x5555_5555),
    ];
    let mut held: [VecDeque<(Instant, nfq::Message)>; 2] = [VecDeque::new(), VecDeque::new()];
    while !stop.load(Ordering::Relaxed) {
        loop {
            match q.recv() {
                Ok(msg) => {
                    let dir = usize::from(msg.get_queue_num() == QUEUE_UP);
                    match schedules[dir].admit(Instant::now()) {
                        Some(release) => held[dir].push_back((release, msg)),
                        None => crate::queue::release(&mut q, msg, Verdict::Drop)?,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        let mut next = now + IDLE_TICK;
        for queue in &mut held {
            while queue.front().is_some_and(|(release, _)| *release <= now) {
                if let Some((_, msg)) = queue.pop_front() {
                    crate::queue::release(&mut q, msg, Verdict::Accept)?;
                }
            }
            if let Some((release, _)) = queue.front() {
                next = next.min(*release);
            }
        }
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // Let go of everything still held rather than lose it.
    for queue in &mut held {
        for (_, msg) in queue.drain(..) {
            crate::queue::release(&mut q, msg, Verdict::Accept)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(delay_ms: u32, jitter_ms: u32, loss_pct: f64) -> LinkCondition {
        LinkCondition {
            delay_ms,
            jitter_ms,
            loss_pct,
        }
    }

    #[test]
    fn fixed_delay_releases_after_exactly_the_delay() {
        let t0 = Instant::now();
        let mut s = Schedule::new(cond(25, 0, 0.0), 1);
        assert_eq!(s.admit(t0), Some(t0 + Duration::from_millis(25)));
        assert_eq!(
            s.admit(t0 + Duration::from_millis(3)),
            Some(t0 + Duration::from_millis(28))
        );
    }

    #[test]
    fn jitter_stays_in_bounds_and_never_reorders() {
        let t0 = Instant::now();
        let mut s = Schedule::new(cond(20, 10, 0.0), 7);
        let mut last = t0;
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..2000u64 {
            let now = t0 + Duration::from_millis(i * 5);
            let release = s.admit(now).expect("no loss configured");
            assert!(release >= last, "packet {i} overtook its predecessor");
            let d = release - now;
            assert!(
                d <= Duration::from_millis(30),
                "delay {d:?} above delay + jitter"
            );
            spread = (spread.0.min(d), spread.1.max(d));
            last = release;
        }
        assert!(spread.0 < Duration::from_millis(12) && spread.1 > Duration::from_millis(28));
    }

    #[test]
    fn loss_matches_the_configured_rate_and_is_repeatable() {
        let t0 = Instant::now();
        let lost = |seed| {
            let mut s = Schedule::new(cond(0, 0, 10.0), seed);
            (0..10_000).filter(|_| s.admit(t0).is_none()).count()
        };
        let n = lost(42);
        assert!((900..1100).contains(&n), "lost {n} of 10000 at 10%");
        assert_eq!(n, lost(42), "same seed, same losses");
    }

    #[test]
    fn router_rules_cover_forwarded_upstream_traffic_but_not_hairpin() {
        let plan = crate::topology::Topology::from_toml(
            "[router.r]\nnat = \"cgnat\"\nlink = { delay_ms = 5 }\n[host.h]\nupstream = \"r\"",
        )
        .and_then(|t| t.plan("x"))
        .expect("valid");
        let router = rules(plan.node("r").expect("r"));
        assert_eq!(router.len(), 3);
        assert_eq!(
            router[0].join(" "),
            "-A PREROUTING -i wan -j NFQUEUE --queue-num 0"
        );
        assert_eq!(
            router[2].join(" "),
            "-A PREROUTING -i lan -m addrtype ! --dst-type LOCAL -j NFQUEUE --queue-num 1"
        );
        let host = rules(plan.node("h").expect("h"));
        assert_eq!(
            host[1].join(" "),
            "-A OUTPUT -o eth0 -j NFQUEUE --queue-num 1"
        );
        assert_eq!(host.len(), 2);
    }
}
