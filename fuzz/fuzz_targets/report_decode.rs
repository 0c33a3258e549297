//! Hole-punch reports come from anyone with an API key: decoding the protobuf and validating
//! it must never panic, and a report that passes validation must hold what the store relies on
//! (ordered timestamps, durations that are numbers, statistics only from real pings, every
//! address a relay flag can be told for). Run with `cargo fuzz run report_decode`.
#![no_main]

use api::pb::TrackHolePunchRequest;
use api::report::Report;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = TrackHolePunchRequest::decode(data) else {
        return;
    };
    let Ok(report) = Report::from_request(&request) else {
        return;
    };
    assert!(report.connect_started_at > 0 && report.connect_ended_at >= report.connect_started_at);
    assert!(report.ended_at >= report.connect_started_at);
    assert!(!report.listen_addrs.is_empty());
    for a in &report.attempts {
        assert!(a.ended_at >= a.opened_at);
        assert!(a.elapsed_time.is_finite() && a.elapsed_time >= 0.0);
    }
    for l in &report.latencies {
        for v in [l.avg, l.min, l.max, l.std].into_iter().flatten() {
            assert!(v.is_finite() && v >= 0.0, "statistics leave the -1 sentinels out");
        }
    }
    if let Some(t) = report.time_to_direct {
        assert!(t.is_finite() && t >= 0.0);
    }
});
