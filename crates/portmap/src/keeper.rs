//! The life of held mappings, sans-IO: when to renew, when to re-create, what to report.
//!
//! A [`Keeper`] holds the mappings a program wants and decides, from what the driver tells it,
//! what the driver should send next. It never touches a socket or a clock: the driver passes
//! `now` (time since any fixed start) into every call, which is what lets the tests run hours
//! of router life in microseconds.
//!
//! The rules it follows:
//! * a mapping is renewed at half its granted lifetime, asking for the external port it has, so
//!   that the port survives renewals (a permanent UPnP lease is re-asserted every
//!   [`PERMANENT_RECHECK`]);
//! * a failed request is retried after 1, 2, 4 … s (at most [`MAX_RETRY`]);
//! * every epoch the gateway reports (in responses and in announcements) goes through the
//!   RFC 6887 §8.5 test; when the gateway has lost its state, every mapping is re-created at once,
//!   still asking for its old port;
//! * a periodic check (the driver's cheapest question: NAT-PMP external address, PCP ANNOUNCE,
//!   UPnP GetExternalIPAddress plus the mapping list) notices what no announcement told;
//! * a changed external address is reported once, and every mapping is renewed at once so that
//!   the gateway's answers (and the program's record) carry the new address;
//! * a released mapping is never asked for again.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;

use crate::Protocol;
use crate::epoch::{EpochCheck, EpochTracker};

/// How often a permanent (lease 0) UPnP mapping is re-asserted.
pub const PERMANENT_RECHECK: Duration = Duration::from_secs(3600);
/// Longest wait between retries of a failed request.
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// How a mapping was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// PCP (RFC 6887).
    Pcp,
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// UPnP IGD.
    Upnp,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pcp => "pcp",
            Self::NatPmp => "nat-pmp",
            Self::Upnp => "upnp",
        })
    }
}

/// A mapping a program wants held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The port on this host.
    pub internal_port: u16,
    /// The external port to ask for first (`None`: the internal port).
    pub external_port: Option<u16>,
    /// The lifetime to ask for.
    pub lifetime: Duration,
}

/// What a gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The external port.
    pub external_port: u16,
    /// The external address, if the response carried one.
    pub external_ip: Option<Ipv4Addr>,
    /// The granted lifetime; zero for a permanent UPnP lease.
    pub lifetime: Duration,
    /// The gateway's epoch in the response (NAT-PMP and PCP).
    pub epoch: Option<u32>,
}

/// Something the driver must send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask for mapping `id` (create or renew): the same nonce as before, this external port.
    Map {
        /// The mapping.
        id: usize,
        /// The external port to suggest.
        external_port: u16,
    },
    /// Run the periodic check and report with [`Keeper::on_epoch`], [`Keeper::on_external_ip`]
    /// and [`Keeper::on_missing`].
    Check,
}

/// Something that happened, for people and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A mapping exists for the first time.
    Mapped {
        /// The mapping.
        id: usize,
        /// Its external port.
        external_port: u16,
        /// Its lifetime in seconds (0: permanent).
        lifetime_secs: u64,
    },
    /// A renewal kept the mapping (the port may have changed if the gateway insisted).
    Renewed {
        /// The mapping.
        id: usize,
        /// Its external port now.
        external_port: u16,
        /// Its external port before.
        previous_port: u16,
        /// The new lifetime in seconds.
        lifetime_secs: u64,
    },
    /// The gateway lost every mapping (reboot, reset, address change).
    GatewayLostState {
        /// Why the keeper believes so.
        reason: String,
    },
    /// A mapping was made again after the gateway lost it.
    Remapped {
        /// The mapping.
        id: usize,
        /// Its external port now.
        external_port: u16,
        /// Its external port before the loss.
        previous_port: u16,
    },
    /// The gateway's external address changed.
    ExternalIpChanged {
        /// Before.
        old: Ipv4Addr,
        /// Now.
        new: Ipv4Addr,
    },
    /// The periodic check got no usable answer; the mappings are kept as they are.
    CheckFailed {
        /// What went wrong.
        error: String,
    },
    /// A mapping was deleted on the gateway (the program is stopping).
    Released {
        /// The mapping.
        id: usize,
        /// The external port it had.
        external_port: u16,
    },
    /// Deleting a mapping failed (the program is stopping; it is not retried).
    ReleaseFailed {
        /// The mapping.
        id: usize,
        /// What went wrong.
        error: String,
    },
    /// A request failed; it will be retried.
    Failed {
        /// The mapping.
        id: usize,
        /// What went wrong.
        error: String,
        /// Seconds until the retry.
        retry_in_secs: f64,
    },
}

#[derive(Debug, Clone)]
struct Slot {
    want: Want,
    /// The external port held (or last held).
    port: Option<u16>,
    /// Whether the mapping currently exists as far as the keeper knows.
    live: bool,
    /// Set when the gateway lost the mapping and it has not been made again.
    lost: bool,
    /// When to send the next request.
    due: Duration,
    /// A request is out and not yet answered.
    in_flight: bool,
    /// Deleted on purpose: never asked for again.
    released: bool,
    failures: u32,
}

/// The mappings a program holds, and what to do about them.
#[derive(Debug, Clone)]
pub struct Keeper {
    slots: Vec<Slot>,
    epoch: EpochTracker,
    external_ip: Option<Ipv4Addr>,
    check_interval: Duration,
    next_check: Duration,
    check_in_flight: bool,
}

impl Keeper {
    /// A keeper for `wants` (their ids are their indices), checking the gateway every
    /// `check_interval`. Every mapping is due at once.
    pub fn new(wants: &[Want], check_interval: Duration, now: Duration) -> Self {
        Self {
            slots: wants
                .iter()
                .map(|&want| Slot {
                    want,
                    port: None,
                    live: false,
                    lost: false,
                    due: now,
                    in_flight: false,
                    released: false,
                    failures: 0,
                })
                .collect(),
            epoch: EpochTracker::default(),
            external_ip: None,
            check_interval,
            next_check: now + check_interval,
            check_in_flight: false,
        }
    }

    /// What is due at `now`. Each returned request is marked in flight until answered.
    pub fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if !slot.in_flight && !slot.released && slot.due <= now {
                slot.in_flight = true;
                let external_port = slot
                    .port
                    .or(slot.want.external_port)
                    .unwrap_or(slot.want.internal_port);
                actions.push(Action::Map { id, external_port });
            }
        }
        if !self.check_in_flight && self.next_check <= now {
            self.check_in_flight = true;
            actions.push(Action::Check);
        }
        actions
    }

    /// When [`Keeper::poll`] next has something to do (at the latest).
    pub fn next_wakeup(&self) -> Duration {
        let slots = self
            .slots
            .iter()
            .filter(|s| !s.in_flight && !s.released)
            .map(|s| s.due);
        let check = (!self.check_in_flight).then_some(self.next_check);
        slots.chain(check).min().unwrap_or(self.next_check)
    }

    /// The external port of mapping `id`, if it is live.
    pub fn port(&self, id: usize) -> Option<u16> {
        self.slots.get(id).filter(|s| s.live).and_then(|s| s.port)
    }

    /// The gateway granted mapping `id`.
    pub fn on_granted(&mut self, id: usize, grant: Grant, now: Duration) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(epoch) = grant.epoch {
            events.extend(self.on_epoch(epoch, now));
        }
        if let Some(ip) = grant.external_ip {
            events.extend(self.on_external_ip(ip, now));
        }
        let Some(slot) = self.slots.get_mut(id) else {
            return events;
        };
        let previous = slot.port;
        let external_port = grant.external_port;
        let lifetime_secs = grant.lifetime.as_secs();
        events.push(match (previous, slot.live, slot.lost) {
            (Some(previous_port), _, true) => Event::Remapped {
                id,
                external_port,
                previous_port,
            },
            (Some(previous_port), true, false) => Event::Renewed {
                id,
                external_port,
                previous_port,
                lifetime_secs,
            },
            _ => Event::Mapped {
                id,
                external_port,
                lifetime_secs,
            },
        });
        slot.port = Some(external_port);
        slot.live = true;
        slot.lost = false;
        slot.in_flight = false;
        slot.failures = 0;
        slot.due = now
            + if grant.lifetime.is_zero() {
                PERMANENT_RECHECK
            } else {
                grant.lifetime / 2
            };
        events
    }

    /// A request for mapping `id` failed (no answer, or a refusal).
    pub fn on_failed(&mut self, id: usize, error: &str, now: Duration) -> Vec<Event> {
        let Some(slot) = self.slots.get_mut(id) else {
            return Vec::new();
        };
        slot.in_flight = false;
        slot.failures = slot.failures.saturating_add(1);
        let shift = slot.failures.saturating_sub(1).min(16);
        let retry = Duration::from_secs(1u64 << shift).min(MAX_RETRY);
        slot.due = now + retry;
        vec![Event::Failed {
            id,
            error: error.to_owned(),
            retry_in_secs: retry.as_secs_f64(),
        }]
    }

    /// The periodic check finished (whatever it found was reported separately).
    pub fn on_check_done(&mut self, now: Duration) {
        self.check_in_flight = false;
        self.next_check = now + self.check_interval;
    }

    /// Run the check now (an announcement arrived, or the network changed).
    pub fn check_soon(&mut self, now: Duration) {
        self.check_by(now);
    }

    /// Run the check at `at` at the latest. A burst of hints (a router multicasts a dozen SSDP
    /// NOTIFYs when it starts) collapses into one check when each asks for a moment later.
    pub fn check_by(&mut self, at: Duration) {
        self.next_check = self.next_check.min(at);
    }

    /// Renew every live mapping at `at` at the latest: the gateway said something unasked (an
    /// announcement), which it does after it restarted or changed address. The epoch test
    /// cannot tell a restart within two seconds of the last answer from clock jitter, so the
    /// renewal is what makes sure the mappings exist.
    pub fn renew_by(&mut self, at: Duration) {
        for slot in self.slots.iter_mut().filter(|s| s.live) {
            slot.due = slot.due.min(at);
        }
    }

    /// Mapping `id` was deleted on the gateway: it is not live and never asked for again.
    pub fn on_released(&mut self, id: usize) -> Vec<Event> {
        let Some(slot) = self.slots.get_mut(id).filter(|s| !s.released) else {
            return Vec::new();
        };
        slot.released = true;
        slot.live = false;
        slot.port.map_or_else(Vec::new, |external_port| {
            vec![Event::Released { id, external_port }]
        })
    }

    /// The gateway reported `epoch` (in a response or an announcement). If it lost its state,
    /// every mapping is due again at once.
    pub fn on_epoch(&mut self, epoch: u32, now: Duration) -> Vec<Event> {
        match self.epoch.observe(epoch, now) {
            EpochCheck::Lost(loss) => self.lose_all(&format!("{loss}"), now),
            _ => Vec::new(),
        }
    }

    /// The gateway's table lacks mapping `id` (a UPnP check): make it again now.
    pub fn on_missing(&mut self, id: usize, now: Duration) -> Vec<Event> {
        let Some(slot) = self.slots.get_mut(id).filter(|s| s.live) else {
            return Vec::new();
        };
        slot.live = false;
        slot.lost = true;
        slot.due = now;
        vec![Event::GatewayLostState {
            reason: format!("mapping {id} is no longer in the gateway's table"),
        }]
    }

    /// The gateway's external address is `ip`. When it changed, every live mapping is renewed
    /// at once (RFC 6887 §14.1.3 asks the same after an ANNOUNCE).
    pub fn on_external_ip(&mut self, ip: Ipv4Addr, now: Duration) -> Vec<Event> {
        let old = self.external_ip.replace(ip);
        match old {
            Some(old) if old != ip => {
                self.renew_by(now);
                vec![Event::ExternalIpChanged { old, new: ip }]
            }
            _ => Vec::new(),
        }
    }

    fn lose_all(&mut self, reason: &str, now: Duration) -> Vec<Event> {
        for slot in self.slots.iter_mut().filter(|s| !s.released) {
            if slot.live {
                slot.live = false;
                slot.lost = true;
            }
            slot.due = now;
            slot.failures = 0;
        }
        vec![Event::GatewayLostState {
            reason: reason.to_owned(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn want(port: u16) -> Want {
        Want {
            protocol: Protocol::Udp,
            internal_port: port,
            external_port: None,
            lifetime: 7200 * S,
        }
    }

    fn grant(port: u16, lifetime: u32, epoch: u32) -> Grant {
        Grant {
            external_port: port,
            external_ip: Some(Ipv4Addr::new(11, 99, 0, 10)),
            lifetime: lifetime * S,
            epoch: Some(epoch),
        }
    }

    #[test]
    fn renews_at_half_the_granted_lifetime_asking_for_the_same_port() {
        let mut k = Keeper::new(&[want(6000)], 3600 * S, Duration::ZERO);
        assert_eq!(
            k.poll(Duration::ZERO),
            [Action::Map {
                id: 0,
                external_port: 6000
            }]
        );
        assert!(
            k.poll(Duration::ZERO).is_empty(),
            "in flight: not sent twice"
        );
        // The gateway gives another port and only 600 s.
        let ev = k.on_granted(0, grant(26000, 600, 100), Duration::ZERO);
        assert!(matches!(
            ev.last(),
            Some(Event::Mapped {
                external_port: 26000,
                ..
            })
        ));
        assert_eq!(k.next_wakeup(), 300 * S);
        assert!(k.poll(299 * S).is_empty());
        assert_eq!(
            k.poll(300 * S),
            [Action::Map {
                id: 0,
                external_port: 26000
            }]
        );
        let ev = k.on_granted(0, grant(26000, 600, 400), 300 * S);
        assert_eq!(
            ev,
            [Event::Renewed {
                id: 0,
                external_port: 26000,
                previous_port: 26000,
                lifetime_secs: 600
            }]
        );
    }

    #[test]
    fn an_epoch_that_restarts_recreates_every_mapping_with_its_old_port() {
        let mut k = Keeper::new(&[want(6000), want(6001)], 3600 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        k.on_granted(0, grant(6000, 7200, 50), Duration::ZERO);
        k.on_granted(1, grant(6001, 7200, 50), Duration::ZERO);
        // 100 s later an announcement says epoch 3: the gateway rebooted.
        let ev = k.on_epoch(3, 100 * S);
        assert!(matches!(ev[..], [Event::GatewayLostState { .. }]), "{ev:?}");
        assert_eq!(k.port(0), None, "not live until made again");
        assert_eq!(
            k.poll(100 * S),
            [
                Action::Map {
                    id: 0,
                    external_port: 6000
                },
                Action::Map {
                    id: 1,
                    external_port: 6001
                }
            ]
        );
        let ev = k.on_granted(0, grant(6000, 7200, 4), 101 * S);
        assert_eq!(
            ev,
            [Event::Remapped {
                id: 0,
                external_port: 6000,
                previous_port: 6000
            }]
        );
        assert_eq!(k.port(0), Some(6000));
    }

    #[test]
    fn epochs_that_follow_the_clock_change_nothing() {
        let mut k = Keeper::new(&[want(6000)], 30 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        k.on_granted(0, grant(6000, 7200, 1000), Duration::ZERO);
        for t in (30..3600).step_by(30) {
            assert!(k.on_epoch(1000 + t, t * S).is_empty(), "at {t}");
        }
        assert_eq!(k.port(0), Some(6000));
    }

    #[test]
    fn failures_back_off_and_a_missing_upnp_mapping_is_made_again() {
        let mut k = Keeper::new(&[want(7000)], 10 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        let ev = k.on_failed(0, "timeout", Duration::ZERO);
        assert!(matches!(ev[..], [Event::Failed { retry_in_secs, .. }] if retry_in_secs == 1.0));
        k.poll(S);
        k.on_failed(0, "timeout", S);
        assert_eq!(k.next_wakeup(), 3 * S, "second retry after 2 s");
        for i in 0..20 {
            k.poll(i * 1000 * S);
            k.on_failed(0, "timeout", i * 1000 * S);
        }
        assert_eq!(k.next_wakeup(), 19_000 * S + MAX_RETRY);
        // The periodic check went out during those polls; it reports back now.
        k.on_check_done(20_000 * S);
        k.poll(20_000 * S);
        k.on_granted(
            0,
            Grant {
                external_port: 7000,
                external_ip: None,
                lifetime: Duration::ZERO,
                epoch: None,
            },
            20_000 * S,
        );
        assert_eq!(
            k.next_wakeup(),
            20_010 * S,
            "the check comes before the hourly re-assert"
        );
        assert!(matches!(
            k.on_missing(0, 20_005 * S)[..],
            [Event::GatewayLostState { .. }]
        ));
        assert_eq!(
            k.poll(20_005 * S),
            [Action::Map {
                id: 0,
                external_port: 7000
            }]
        );
    }

    #[test]
    fn checks_repeat_and_an_address_change_is_reported_once() {
        let mut k = Keeper::new(&[], 30 * S, Duration::ZERO);
        assert!(k.poll(29 * S).is_empty());
        assert_eq!(k.poll(30 * S), [Action::Check]);
        assert!(k.poll(31 * S).is_empty(), "one check at a time");
        let a = Ipv4Addr::new(11, 99, 0, 10);
        let b = Ipv4Addr::new(11, 99, 0, 20);
        assert!(
            k.on_external_ip(a, 31 * S).is_empty(),
            "the first address is no change"
        );
        assert_eq!(
            k.on_external_ip(b, 31 * S),
            [Event::ExternalIpChanged { old: a, new: b }]
        );
        assert!(k.on_external_ip(b, 31 * S).is_empty());
        k.on_check_done(31 * S);
        assert_eq!(k.next_wakeup(), 61 * S);
        k.check_soon(40 * S);
        assert_eq!(k.poll(40 * S), [Action::Check]);
    }

    #[test]
    fn an_address_change_renews_every_live_mapping_now() {
        let mut k = Keeper::new(&[want(6000), want(6001)], 3600 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        k.on_granted(0, grant(6000, 7200, 10), Duration::ZERO);
        k.on_failed(1, "timeout", Duration::ZERO);
        assert!(
            k.poll(10 * S)
                .iter()
                .all(|a| matches!(a, Action::Map { id: 1, .. }))
        );
        k.on_failed(1, "timeout", 10 * S);
        let ev = k.on_external_ip(Ipv4Addr::new(11, 99, 0, 20), 11 * S);
        assert!(
            matches!(ev[..], [Event::ExternalIpChanged { .. }]),
            "{ev:?}"
        );
        assert_eq!(
            k.poll(11 * S),
            [Action::Map {
                id: 0,
                external_port: 6000
            }],
            "the live mapping is renewed at once; the failing one keeps its backoff"
        );
    }

    #[test]
    fn released_mappings_are_never_asked_for_again() {
        let mut k = Keeper::new(&[want(6000)], 30 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        k.on_granted(0, grant(6000, 120, 10), Duration::ZERO);
        assert_eq!(
            k.on_released(0),
            [Event::Released {
                id: 0,
                external_port: 6000
            }]
        );
        assert!(k.on_released(0).is_empty(), "released once");
        assert_eq!(k.port(0), None);
        assert!(k.on_epoch(0, 40 * S).len() == 1, "the gateway lost state");
        assert_eq!(
            k.poll(40 * S),
            [Action::Check],
            "but the mapping stays released"
        );
        k.on_check_done(41 * S);
        assert_eq!(k.next_wakeup(), 71 * S, "only the next check is pending");
    }

    #[test]
    fn a_burst_of_hints_makes_one_check() {
        let mut k = Keeper::new(&[], 600 * S, Duration::ZERO);
        for ms in [0u64, 3, 7, 12] {
            k.check_by(Duration::from_millis(ms + 500));
        }
        assert!(k.poll(Duration::from_millis(499)).is_empty());
        assert_eq!(k.poll(Duration::from_millis(500)), [Action::Check]);
        k.check_by(Duration::from_millis(900));
        assert!(
            k.poll(Duration::from_millis(900)).is_empty(),
            "one at a time"
        );
        k.on_check_done(Duration::from_millis(950));
        assert_eq!(k.next_wakeup(), Duration::from_millis(950) + 600 * S);
    }

    #[test]
    fn a_hint_renews_live_mappings_but_not_sooner_than_due() {
        let mut k = Keeper::new(&[want(6000), want(6001)], 600 * S, Duration::ZERO);
        k.poll(Duration::ZERO);
        k.on_granted(0, grant(6000, 7200, 10), Duration::ZERO);
        k.on_failed(1, "timeout", Duration::ZERO);
        k.poll(S);
        k.on_granted(1, grant(6001, 4, 11), S);
        // Mapping 1 is due at 3 s anyway; mapping 0 only at 3600 s.
        k.renew_by(5 * S);
        assert_eq!(
            k.poll(3 * S),
            [Action::Map {
                id: 1,
                external_port: 6001
            }]
        );
        assert_eq!(
            k.poll(5 * S),
            [Action::Map {
                id: 0,
                external_port: 6000
            }]
        );
    }
}
