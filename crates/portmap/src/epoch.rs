//! Has the gateway lost its mappings? Every NAT-PMP and PCP response (and announcement) carries
//! the server's epoch: seconds since its mapping state began. A server that reboots or resets
//! starts counting again, so comparing how far its epoch moved with how far the client's own
//! clock moved between two responses reveals the loss, and the client must then re-create every
//! mapping it holds with that server.
//!
//! [`EpochTracker`] keeps the previous (client time, server epoch) pair for one server and
//! judges each new one by one of two rules, with integer seconds:
//!
//! * [`Rule::Pcp`], RFC 6887 §8.5. With `C` the client's time and `S` the server's epoch:
//!   1. invalid if `S_curr + 1 < S_prev` (the epoch went back by more than one second; one is
//!      forgiven for reordered packets);
//!   2. otherwise, with `C_delta = C_curr - C_prev` and `S_delta = S_curr - S_prev`, invalid if
//!      `C_delta + 2 < S_delta - S_delta / 16` (the server counted too many seconds) or
//!      `S_delta + 2 < C_delta - C_delta / 16` (too few): 2 s of slack for whole-second clocks
//!      and 1/16 (6.25 %) for drift.
//! * [`Rule::NatPmp`], RFC 6886 §3.6: the client expects at least `S_prev + 7/8 × C_delta` and
//!   the epoch is invalid if `S_curr + 2` is below that. One-sided: a server that counts too
//!   fast passes, and one up to 12.5 % slow passes where the PCP rule allows 6.25 %.
//!
//! Either way the new pair replaces the previous one, valid or not (RFC 6887 §8.5), so after a
//! reboot the next comparison starts from the new epoch. The first observation has nothing to
//! compare with and is [`EpochCheck::First`].
//!
//! The arithmetic is done in `i128` on the `u32` epochs and `u64` seconds, so nothing overflows
//! and the deltas may be negative as the RFC's formulas expect. Client seconds are whole
//! seconds of the `now` passed in (`now.as_secs()`), like the server's.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Which RFC's test to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// RFC 6887 §8.5 (PCP's epoch time): two-sided, 1/16 + 2 s of slack.
    Pcp,
    /// RFC 6886 §3.6 (NAT-PMP's seconds since start of epoch): one-sided, 7/8 of the client's
    /// elapsed time minus 2 s.
    NatPmp,
}

/// The verdict on one observed epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EpochCheck {
    /// Nothing to compare with yet: the epoch is taken as it is.
    First,
    /// The server's epoch moved as the client's clock did: its mappings are still there.
    Valid,
    /// The server lost its state (reboot, reset, address change on some gateways): re-create
    /// every mapping held with it.
    Lost(Loss),
}

impl EpochCheck {
    /// Whether the server lost its state.
    pub const fn is_lost(self) -> bool {
        matches!(self, Self::Lost(_))
    }
}

/// Which part of the test failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// The epoch went backwards (by more than one second under [`Rule::Pcp`]): the usual sign
    /// of a reboot.
    WentBackwards,
    /// The epoch advanced too little for the time the client saw pass: the server restarted
    /// counting while the client was not looking.
    ServerBehind,
    /// The epoch advanced too much for the time the client saw pass ([`Rule::Pcp`] only).
    ServerAhead,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WentBackwards => "the gateway's epoch went backwards",
            Self::ServerBehind => "the gateway's epoch advanced less than the client's clock",
            Self::ServerAhead => "the gateway's epoch advanced more than the client's clock",
        })
    }
}

/// Epoch validation for one server (sans-IO: the caller passes its own monotonic time).
///
/// Keep one tracker per server, feed it the epoch of every response and announcement from that
/// server, and start a fresh one when the gateway changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochTracker {
    rule: Rule,
    /// Client whole seconds and server epoch of the previous observation.
    previous: Option<(u64, u32)>,
}

impl EpochTracker {
    /// A tracker with nothing observed yet.
    pub const fn new(rule: Rule) -> Self {
        Self {
            rule,
            previous: None,
        }
    }

    /// A tracker for a PCP server ([`Rule::Pcp`]).
    pub const fn pcp() -> Self {
        Self::new(Rule::Pcp)
    }

    /// A tracker for a NAT-PMP gateway ([`Rule::NatPmp`]).
    pub const fn nat_pmp() -> Self {
        Self::new(Rule::NatPmp)
    }

    /// The rule applied.
    pub const fn rule(&self) -> Rule {
        self.rule
    }

    /// The epoch seen last, if any.
    pub fn previous_epoch(&self) -> Option<u32> {
        self.previous.map(|(_, server)| server)
    }

    /// Judges `server_epoch`, received at client time `now` (a monotonic clock: for example
    /// `Instant::now() - start`; it must not go backwards), then remembers both.
    pub fn observe(&mut self, server_epoch: u32, now: Duration) -> EpochCheck {
        let client = now.as_secs();
        let check = match self.previous {
            None => EpochCheck::First,
            Some((c_prev, s_prev)) => judge(self.rule, (c_prev, s_prev), (client, server_epoch)),
        };
        self.previous = Some((client, server_epoch));
        check
    }

    /// Forgets the previous observation: the next one is [`EpochCheck::First`].
    pub fn reset(&mut self) {
        self.previous = None;
    }
}

impl Default for EpochTracker {
    /// A tracker with the RFC 6887 §8.5 rule, the stricter of the two.
    fn default() -> Self {
        Self::pcp()
    }
}

/// The test itself, on (client seconds, server epoch) pairs.
fn judge(rule: Rule, previous: (u64, u32), current: (u64, u32)) -> EpochCheck {
    let c_prev = i128::from(previous.0);
    let s_prev = i128::from(previous.1);
    let c_curr = i128::from(current.0);
    let s_curr = i128::from(current.1);
    let c_delta = c_curr - c_prev;
    let s_delta = s_curr - s_prev;
    match rule {
        Rule::Pcp => {
            if s_curr + 1 < s_prev {
                EpochCheck::Lost(Loss::WentBackwards)
            } else if c_delta + 2 < s_delta - s_delta / 16 {
                EpochCheck::Lost(Loss::ServerAhead)
            } else if s_delta + 2 < c_delta - c_delta / 16 {
                EpochCheck::Lost(Loss::ServerBehind)
            } else {
                EpochCheck::Valid
            }
        }
        Rule::NatPmp => {
            let expected = s_prev + c_delta * 7 / 8;
            if s_curr + 2 >= expected {
                EpochCheck::Valid
            } else if s_curr < s_prev {
                EpochCheck::Lost(Loss::WentBackwards)
            } else {
                EpochCheck::Lost(Loss::ServerBehind)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The verdict on (client seconds, epoch) `current` after `previous`.
    fn pcp(previous: (u64, u32), current: (u64, u32)) -> EpochCheck {
        let mut t = EpochTracker::pcp();
        assert_eq!(t.observe(previous.1, secs(previous.0)), EpochCheck::First);
        t.observe(current.1, secs(current.0))
    }

    fn nat_pmp(previous: (u64, u32), current: (u64, u32)) -> EpochCheck {
        let mut t = EpochTracker::nat_pmp();
        assert_eq!(t.observe(previous.1, secs(previous.0)), EpochCheck::First);
        t.observe(current.1, secs(current.0))
    }

    #[test]
    fn normal_progress_is_valid() {
        let mut t = EpochTracker::pcp();
        assert_eq!(t.observe(100, secs(1000)), EpochCheck::First);
        assert_eq!(t.observe(160, secs(1060)), EpochCheck::Valid);
        assert_eq!(t.observe(3760, secs(4660)), EpochCheck::Valid);
        assert_eq!(
            t.observe(3760, secs(4660)),
            EpochCheck::Valid,
            "same second"
        );
        assert_eq!(t.previous_epoch(), Some(3760));
        let mut t = EpochTracker::nat_pmp();
        assert_eq!(t.observe(100, secs(1000)), EpochCheck::First);
        assert_eq!(t.observe(160, secs(1060)), EpochCheck::Valid);
    }

    #[test]
    fn sub_second_client_times_use_whole_seconds() {
        let mut t = EpochTracker::pcp();
        assert_eq!(t.observe(10, Duration::from_millis(999)), EpochCheck::First);
        assert_eq!(
            t.observe(12, Duration::from_millis(1001)),
            EpochCheck::Valid
        );
    }

    #[test]
    fn a_reboot_is_lost_and_the_next_response_is_judged_from_it() {
        // miniupnpd in the lab: 316 s of epoch, then a reboot, back at 4 s.
        let mut t = EpochTracker::pcp();
        t.observe(300, secs(50));
        assert_eq!(t.observe(316, secs(66)), EpochCheck::Valid);
        assert_eq!(
            t.observe(4, secs(80)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
        assert_eq!(t.observe(4, secs(80)), EpochCheck::Valid);
        assert_eq!(t.observe(64, secs(140)), EpochCheck::Valid);
        assert_eq!(
            nat_pmp((50, 300), (80, 4)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
    }

    #[test]
    fn a_reset_to_zero_after_an_address_change_is_lost() {
        // miniupnpd multicasts epoch 0 with its new address.
        assert_eq!(
            pcp((1000, 5000), (1003, 0)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
        assert!(nat_pmp((1000, 5000), (1003, 0)).is_lost());
    }

    #[test]
    fn a_reboot_while_the_client_was_away_is_lost() {
        // The epoch moved forward, but 500 s where the client saw 3600 s pass.
        assert_eq!(
            pcp((0, 300), (3600, 800)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
        assert_eq!(
            nat_pmp((0, 300), (3600, 800)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
    }

    #[test]
    fn one_second_back_is_forgiven_two_are_not() {
        assert_eq!(pcp((10, 100), (10, 99)), EpochCheck::Valid);
        assert_eq!(pcp((10, 100), (11, 99)), EpochCheck::Valid);
        assert_eq!(
            pcp((10, 100), (10, 98)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
        // RFC 6886's estimate has 2 s of slack on its own.
        assert_eq!(nat_pmp((10, 100), (10, 98)), EpochCheck::Valid);
        assert_eq!(
            nat_pmp((10, 100), (10, 97)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
    }

    #[test]
    fn a_server_ten_percent_slow() {
        // Over short intervals the 2 s cover it: 20 s against 18 s.
        assert_eq!(pcp((0, 1000), (20, 1018)), EpochCheck::Valid);
        // 90 % of 50 s is 45: 45 + 2 < 50 - 3 is false, still valid.
        assert_eq!(pcp((0, 1000), (50, 1045)), EpochCheck::Valid);
        // 90 % of 51 s is 45.9, the server says 45: 47 < 51 - 3 = 48, lost.
        assert_eq!(
            pcp((0, 1000), (51, 1045)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
        // A renewal an hour later: 3240 + 2 < 3600 - 225, lost under RFC 6887...
        assert_eq!(
            pcp((0, 1000), (3600, 4240)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
        // ...but within RFC 6886's 7/8: 4240 + 2 >= 1000 + 3150.
        assert_eq!(nat_pmp((0, 1000), (3600, 4240)), EpochCheck::Valid);
    }

    #[test]
    fn a_wildly_fast_server() {
        assert_eq!(
            pcp((0, 1000), (100, 2000)),
            EpochCheck::Lost(Loss::ServerAhead)
        );
        // RFC 6886 only looks for servers that are behind.
        assert_eq!(nat_pmp((0, 1000), (100, 2000)), EpochCheck::Valid);
    }

    #[test]
    fn pcp_slack_boundaries() {
        // Client 160 s: 160 / 16 = 10, so the server needs S_delta + 2 >= 150.
        assert_eq!(pcp((0, 0), (160, 148)), EpochCheck::Valid);
        assert_eq!(
            pcp((0, 0), (160, 147)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
        // And S_delta - S_delta / 16 <= 162: 172 - 10 = 162 passes, 173 - 10 = 163 does not.
        assert_eq!(pcp((0, 0), (160, 172)), EpochCheck::Valid);
        assert_eq!(pcp((0, 0), (160, 173)), EpochCheck::Lost(Loss::ServerAhead));
        // With no client time: the server may count 2 s, not 3.
        assert_eq!(pcp((5, 0), (5, 2)), EpochCheck::Valid);
        assert_eq!(pcp((5, 0), (5, 3)), EpochCheck::Lost(Loss::ServerAhead));
        // And 2 s of client time with no epoch change pass, 3 s do not.
        assert_eq!(pcp((5, 7), (7, 7)), EpochCheck::Valid);
        assert_eq!(pcp((5, 7), (8, 7)), EpochCheck::Lost(Loss::ServerBehind));
    }

    #[test]
    fn nat_pmp_slack_boundaries() {
        // Client 80 s: expected 1000 + 70, and 2 s below that still passes.
        assert_eq!(nat_pmp((0, 1000), (80, 1068)), EpochCheck::Valid);
        assert_eq!(
            nat_pmp((0, 1000), (80, 1067)),
            EpochCheck::Lost(Loss::ServerBehind)
        );
    }

    #[test]
    fn extremes_do_not_overflow() {
        for rule in [Rule::Pcp, Rule::NatPmp] {
            let mut t = EpochTracker::new(rule);
            assert_eq!(t.rule(), rule);
            assert_eq!(t.observe(0, Duration::ZERO), EpochCheck::First);
            assert_eq!(
                t.observe(u32::MAX, Duration::MAX),
                EpochCheck::Lost(Loss::ServerBehind)
            );
            // The client's time going backwards is the caller's bug; it is judged anyway.
            let _ = t.observe(0, Duration::ZERO);
            let _ = t.observe(u32::MAX, Duration::ZERO);
            t.reset();
            assert_eq!(t.previous_epoch(), None);
            assert_eq!(t.observe(7, Duration::MAX), EpochCheck::First);
        }
        assert_eq!(
            pcp((0, 0), (0, u32::MAX)),
            EpochCheck::Lost(Loss::ServerAhead)
        );
        assert_eq!(
            pcp((0, u32::MAX), (u64::MAX, 0)),
            EpochCheck::Lost(Loss::WentBackwards)
        );
    }

    #[test]
    fn the_default_is_the_pcp_rule() {
        assert_eq!(EpochTracker::default(), EpochTracker::pcp());
        assert_eq!(
            Loss::WentBackwards.to_string(),
            "the gateway's epoch went backwards"
        );
    }

    #[test]
    fn verdicts_serialise_in_kebab_case() {
        assert_eq!(
            serde_json::to_value(EpochCheck::Lost(Loss::WentBackwards)).expect("serialises"),
            serde_json::json!({"lost": "went-backwards"})
        );
        assert_eq!(
            serde_json::to_value(EpochCheck::Valid).expect("serialises"),
            serde_json::json!("valid")
        );
    }
}
