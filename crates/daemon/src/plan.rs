//! Which techniques a connection tries, in which order, and the sans-IO sequencer that runs
//! them.
//!
//! [`plan`] is the decision table (`docs/daemon-api.md` explains it to applications): from what
//! each end knows of its NAT it orders the techniques into stages. The techniques of a stage run
//! at once (raced), each stage within its budget. The relay is opened from the start as a
//! standby, so that when nothing direct works the application gets the relayed socket at once.
//!
//! | the ends | stages |
//! |---|---|
//! | the remote is reachable (no NAT, or a port mapping) | `direct`, then as below |
//! | this end is reachable and the remote is not | `reversal`, then as below |
//! | both map endpoint-independently, or one does and filters by address at most (full or restricted cone) | UDP: `udp-punch`; TCP: `tcp-simultaneous-open` and `tcp-nutss` raced |
//! | behaviour unknown on either end | as if punchable: the attempt costs one budget |
//! | one maps independently and filters by port, the other maps per destination | UDP: `udp-birthday` (birthday probing); TCP: none direct, the relay at once |
//! | both map per destination | none direct: the relay at once |
//!
//! Why: a mapping that depends on the destination gives the remote a port it cannot learn
//! through the relay, so only an end that accepts any port from the right address (or anyone)
//! can be reached from it. NUTSS runs beside plain simultaneous open because a NAT that answers
//! an unsolicited SYN with a RST kills the plain one, and its low-TTL SYN never reaches that NAT.
//!
//! [`Sequencer`] runs a plan: it takes `now` and the techniques' results, and yields
//! [`Action`]s (start, stop, deliver a socket, fail) and its next timeout. The first direct
//! socket wins and stops the rest; the relay's socket is delivered only once every direct
//! stage is over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use behaviour::{Filtering, Mapping};

use crate::api::{ErrorCode, Proto, Technique};

/// How long one stage of direct techniques may take.
pub const STAGE_BUDGET: Duration = Duration::from_secs(3);
/// How long a connection may take in all, the relay's socket included.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// What one end knows of its NAT (`None`: not known yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Nat {
    /// How its NAT maps.
    pub mapping: Option<Mapping>,
    /// How its NAT filters.
    pub filtering: Option<Filtering>,
    /// It holds a port mapping on its router for the port it would be dialled on.
    pub port_mapped: bool,
    /// Birthday probing was turned off at this end.
    pub no_birthday: bool,
}

impl Nat {
    /// Others can dial it without help: no NAT, or a port mapping.
    pub fn reachable(&self) -> bool {
        self.port_mapped
            || (self.mapping == Some(Mapping::None) && self.filtering == Some(Filtering::None))
    }

    fn known(&self) -> bool {
        self.mapping.is_some() && self.filtering.is_some()
    }

    /// Its external port is the same whatever the destination.
    pub fn independent(&self) -> bool {
        matches!(
            self.mapping,
            Some(Mapping::None | Mapping::EndpointIndependent)
        )
    }

    /// It lets in any port of an address it has sent to.
    fn accepts_any_port(&self) -> bool {
        matches!(
            self.filtering,
            Some(Filtering::None | Filtering::EndpointIndependent | Filtering::AddressDependent)
        )
    }
}

/// Techniques that run at once, within a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The techniques.
    pub techniques: Vec<Technique>,
    /// How long the stage may take.
    pub budget: Duration,
}

/// Whether a hole punch between `a` and `b` can give a direct connection.
pub fn punchable(a: &Nat, b: &Nat) -> bool {
    if !a.known() || !b.known() {
        return true;
    }
    (a.independent() && b.independent())
        || (a.independent() && a.accepts_any_port())
        || (b.independent() && b.accepts_any_port())
}

/// Whether birthday probing can join `a` and `b` where a plain punch cannot: both behaviours
/// known, one end mapping endpoint-independently (it probes) and the other per destination (it
/// opens many mappings), neither having turned it off. Two ends that both map per destination
/// cannot: neither can tell the other where to aim.
pub fn birthday(a: &Nat, b: &Nat) -> bool {
    a.known()
        && b.known()
        && !a.no_birthday
        && !b.no_birthday
        && (a.independent() != b.independent())
}

/// The direct stages for a `proto` connection from `local` to `remote`, in order.
pub fn plan(local: &Nat, remote: &Nat, proto: Proto) -> Vec<Stage> {
    let stage = |techniques: Vec<Technique>| Stage {
        techniques,
        budget: STAGE_BUDGET,
    };
    let mut stages = Vec::new();
    if remote.reachable() {
        stages.push(stage(vec![Technique::Direct]));
    } else if local.reachable() {
        stages.push(stage(vec![Technique::Reversal]));
    }
    if punchable(local, remote) {
        stages.push(stage(match proto {
            Proto::Udp => vec![Technique::UdpPunch],
            Proto::Tcp => vec![Technique::TcpSimultaneousOpen, Technique::TcpNutss],
        }));
    } else if proto == Proto::Udp && birthday(local, remote) {
        stages.push(stage(vec![Technique::UdpBirthday]));
    }
    stages
}

/// A socket a technique made.
#[derive(Debug, Clone, PartialEq)]
pub struct Connected {
    /// The remote address it is connected to (the relay's when relayed).
    pub remote: String,
    /// The round trip measured while connecting.
    pub rtt: Option<Duration>,
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a technique (the relay: open the relayed stream and hold it).
    Start(Technique),
    /// Stop a technique and drop what it made.
    Stop(Technique),
    /// Hand the application the socket `technique` made. The sequencer is over.
    Deliver {
        /// The technique.
        technique: Technique,
        /// Its socket.
        connected: Connected,
    },
    /// Tell the application it failed. The sequencer is over.
    Fail {
        /// For programs.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

/// One technique tried, for the connection's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Tried {
    /// The technique.
    pub technique: Technique,
    /// When it started, after the request.
    pub started: Duration,
    /// When it ended, after the request (`None`: it ran to the end of the connection attempt).
    pub ended: Option<Duration>,
    /// How it ended: `ok`, `stopped`, `timeout` or its failure.
    pub result: String,
}

/// The relay's standby.
#[derive(Debug, Clone, PartialEq)]
enum Relay {
    Opening,
    Ready(Connected),
    Failed(String),
}

/// Runs a plan for one connection.
#[derive(Debug)]
pub struct Sequencer {
    start: Instant,
    deadline: Instant,
    stages: VecDeque<Stage>,
    /// The stage running, and when its budget ends.
    running: Vec<Technique>,
    stage_until: Option<Instant>,
    relay: Relay,
    done: bool,
    tried: Vec<Tried>,
    actions: VecDeque<Action>,
}

impl Sequencer {
    /// Starts `stages` and the relay's standby at `now`.
    pub fn new(now: Instant, stages: Vec<Stage>) -> Self {
        let mut s = Self {
            start: now,
            deadline: now + DEADLINE,
            stages: stages.into(),
            running: Vec::new(),
            stage_until: None,
            relay: Relay::Opening,
            done: false,
            tried: Vec::new(),
            actions: VecDeque::new(),
        };
        s.begin(now, Technique::Relay);
        s.next_stage(now);
        s
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Sequencer::handle_timeout`]; `None` once over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        Some(
            self.stage_until
                .map_or(self.deadline, |t| t.min(self.deadline)),
        )
    }

    /// Whether the application got its answer.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// What was tried, so far.
    pub fn tried(&self) -> &[Tried] {
        &self.tried
    }

    /// `technique` made a socket.
    pub fn connected(&mut self, now: Instant, technique: Technique, connected: Connected) {
        if self.done {
            return;
        }
        if technique == Technique::Relay {
            self.end(now, technique, "ok");
            self.relay = Relay::Ready(connected);
            if self.running.is_empty() && self.stages.is_empty() {
                self.deliver_relay();
            }
            return;
        }
        if !self.running.contains(&technique) {
            return;
        }
        self.end(now, technique, "ok");
        self.running.retain(|t| *t != technique);
        for other in std::mem::take(&mut self.running) {
            self.stop(now, other, "stopped");
        }
        if !matches!(self.relay, Relay::Failed(_)) {
            self.stop(now, Technique::Relay, "stopped");
        }
        self.finish();
        self.actions.push_back(Action::Deliver {
            technique,
            connected,
        });
    }

    /// `technique` failed (`reason` for the record and the application's error).
    pub fn failed(&mut self, now: Instant, technique: Technique, reason: &str) {
        if self.done {
            return;
        }
        if technique == Technique::Relay {
            if self.relay == Relay::Opening {
                self.end(now, technique, reason);
                self.relay = Relay::Failed(reason.to_owned());
                if self.running.is_empty() && self.stages.is_empty() {
                    self.fail_all();
                }
            }
            return;
        }
        if !self.running.contains(&technique) {
            return;
        }
        self.end(now, technique, reason);
        self.running.retain(|t| *t != technique);
        if self.running.is_empty() {
            self.next_stage(now);
        }
    }

    /// The time of [`Sequencer::poll_timeout`] came.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.done {
            return;
        }
        if now >= self.deadline {
            for t in std::mem::take(&mut self.running) {
                self.stop(now, t, "timeout");
            }
            self.stages.clear();
            if let Relay::Ready(_) = self.relay {
                return self.deliver_relay();
            }
            self.stop(now, Technique::Relay, "timeout");
            self.finish();
            self.actions.push_back(Action::Fail {
                code: ErrorCode::Timeout,
                message: format!("no socket within {DEADLINE:?}, the relay's included"),
            });
            return;
        }
        if self.stage_until.is_some_and(|t| now >= t) {
            for t in std::mem::take(&mut self.running) {
                self.stop(now, t, "timeout");
            }
            self.next_stage(now);
        }
    }

    /// Starts the next direct stage, or falls back to the relay.
    fn next_stage(&mut self, now: Instant) {
        self.stage_until = None;
        if let Some(stage) = self.stages.pop_front() {
            self.stage_until = Some(now + stage.budget);
            for t in stage.techniques {
                self.running.push(t);
                self.begin(now, t);
            }
            return;
        }
        match self.relay {
            Relay::Ready(_) => self.deliver_relay(),
            Relay::Failed(_) => self.fail_all(),
            // Delivered when it is ready, or failed at the deadline.
            Relay::Opening => {}
        }
    }

    fn deliver_relay(&mut self) {
        let Relay::Ready(connected) = self.relay.clone() else {
            return;
        };
        self.finish();
        self.actions.push_back(Action::Deliver {
            technique: Technique::Relay,
            connected,
        });
    }

    fn fail_all(&mut self) {
        let relay = match &self.relay {
            Relay::Failed(reason) => reason.clone(),
            _ => "not tried".to_owned(),
        };
        self.finish();
        self.actions.push_back(Action::Fail {
            code: ErrorCode::Timeout,
            message: format!("no direct connection, and the relay failed: {relay}"),
        });
    }

    fn finish(&mut self) {
        self.done = true;
        self.stage_until = None;
    }

    fn begin(&mut self, now: Instant, technique: Technique) {
        self.tried.push(Tried {
            technique,
            started: now.saturating_duration_since(self.start),
            ended: None,
            result: String::new(),
        });
        self.actions.push_back(Action::Start(technique));
    }

    fn stop(&mut self, now: Instant, technique: Technique, result: &str) {
        if self.end(now, technique, result) {
            self.actions.push_back(Action::Stop(technique));
        }
    }

    /// Ends the open record of `technique`; whether there was one.
    fn end(&mut self, now: Instant, technique: Technique, result: &str) -> bool {
        let at = now.saturating_duration_since(self.start);
        match self
            .tried
            .iter_mut()
            .rev()
            .find(|t| t.technique == technique && t.ended.is_none())
        {
            Some(t) => {
                t.ended = Some(at);
                result.clone_into(&mut t.result);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
