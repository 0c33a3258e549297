//! Declaring Prometheus metrics in one line each: a [`Registrar`] creates a metric, registers
//! it under its name and help text, and hands it back, so a role's metrics struct is built as a
//! list of names rather than a create-then-register pair per metric.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A histogram family whose histograms all have the same buckets.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Creates metrics and registers them in one registry, under an optional name prefix.
#[derive(Debug)]
pub struct Registrar<'a> {
    registry: &'a mut Registry,
}

impl<'a> Registrar<'a> {
    /// Registers in `registry`, each name as given.
    pub fn new(registry: &'a mut Registry) -> Self {
        Self { registry }
    }

    /// Registers in `registry`, each name after `prefix` and an underscore.
    pub fn with_prefix(registry: &'a mut Registry, prefix: &str) -> Self {
        Self {
            registry: registry.sub_registry_with_prefix(prefix),
        }
    }

    /// A counter (exported as `NAME_total`).
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let metric = Counter::default();
        self.registry.register(name, help, metric.clone());
        metric
    }

    /// A family of counters, one per label set.
    pub fn counters<L>(&mut self, name: &str, help: &str) -> Family<L, Counter>
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let metric = Family::default();
        self.registry.register(name, help, metric.clone());
        metric
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let metric = Gauge::default();
        self.registry.register(name, help, metric.clone());
        metric
    }

    /// A family of histograms with the buckets of [`latency_histogram`], for durations in
    /// seconds.
    pub fn latencies<L>(&mut self, name: &str, help: &str) -> Histograms<L>
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let metric: Histograms<L> = Family::new_with_constructor(latency_histogram);
        self.registry.register(name, help, metric.clone());
        metric
    }
}

/// A histogram of durations in seconds: 16 buckets doubling from 0.2 ms to about 6.5 s, which
/// spans a database write on loopback to a request held for a peer.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0002, 2.0, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_registered_under_their_names() {
        let mut registry = Registry::default();
        let mut r = Registrar::with_prefix(&mut registry, "natpunch_test");
        let things = r.counter("things", "Things");
        let kinds = r.counters::<Vec<(&'static str, &'static str)>>("kinds", "Kinds");
        let level = r.gauge("level", "Level");
        let took = r.latencies::<Vec<(&'static str, &'static str)>>("took_seconds", "Took");
        things.inc();
        kinds.get_or_create(&vec![("kind", "a")]).inc_by(2);
        level.set(5);
        took.get_or_create(&vec![("op", "x")]).observe(0.001);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "# HELP natpunch_test_things Things.",
            "natpunch_test_things_total 1",
            r#"natpunch_test_kinds_total{kind="a"} 2"#,
            "natpunch_test_level 5",
            r#"natpunch_test_took_seconds_count{op="x"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
