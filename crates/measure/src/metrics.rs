//! The measurement client's Prometheus metrics (`natpunch_client_*`): punches by outcome and
//! transport, what became of the reports, and how many wait in the spool.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use telemetry::metrics::Registrar;

use crate::client::ClientEvent;

/// The client's metrics, fed from its events by [`Metrics::observe`].
#[derive(Debug, Clone)]
pub struct Metrics {
    punches: Family<Vec<(&'static str, String)>, Counter>,
    reports: Family<Vec<(&'static str, &'static str)>, Counter>,
    spool: Gauge,
}

impl Metrics {
    /// Metrics registered in `registry`, with `waiting` reports in the spool at the start.
    pub fn new(registry: &mut Registry, waiting: usize) -> Self {
        let mut r = Registrar::with_prefix(registry, "natpunch_client");
        let m = Self {
            punches: r.counters("punches", "Hole punches by outcome and transport"),
            reports: r.counters(
                "reports",
                "Reports delivered, deferred (kept for later) or rejected",
            ),
            spool: r.gauge("spool_reports", "Reports waiting in the spool"),
        };
        m.spool.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        m
    }

    /// Counts what `e` says: a punch (its report enters the spool), or a report delivered,
    /// rejected (both leave the spool) or deferred.
    pub fn observe(&self, e: &ClientEvent) {
        let report = |what| self.reports.get_or_create(&vec![("result", what)]).inc();
        match e {
            ClientEvent::Punched {
                outcome, transport, ..
            } => {
                let labels = vec![
                    ("outcome", format!("{outcome:?}")),
                    ("transport", transport.clone().unwrap_or_default()),
                ];
                self.punches.get_or_create(&labels).inc();
                self.spool.inc();
            }
            ClientEvent::Delivered { .. } => {
                report("delivered");
                self.spool.dec();
            }
            ClientEvent::Rejected { .. } => {
                report("rejected");
                self.spool.dec();
            }
            ClientEvent::Deferred { .. } => {
                report("deferred");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_punches_and_follow_the_spool() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry, 0);
        let punched = |outcome| ClientEvent::Punched {
            host: "h".into(),
            remote: "r".into(),
            outcome,
            transport: Some("quic".into()),
            time_to_direct_ms: Some(1.0),
            error: None,
            key: "k".into(),
        };
        m.observe(&punched(p2p::record::Outcome::Success));
        m.observe(&punched(p2p::record::Outcome::Success));
        m.observe(&punched(p2p::record::Outcome::Failed));
        m.observe(&ClientEvent::Delivered { key: "k".into() });
        m.observe(&ClientEvent::Deferred {
            key: "k".into(),
            error: "down".into(),
            retry_secs: 1.0,
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"natpunch_client_punches_total{outcome="Success",transport="quic"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"natpunch_client_reports_total{result="delivered"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"natpunch_client_reports_total{result="deferred"} 1"#),
            "{text}"
        );
        assert!(text.contains("natpunch_client_spool_reports 2"), "{text}");
    }
}
