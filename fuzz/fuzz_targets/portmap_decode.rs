//! NAT-PMP and PCP datagrams reach the client from anyone on the LAN (and announcements by
//! multicast): the decoders must never panic, and what they accept must respect the formats'
//! bounds. The epoch tracker takes the same bytes as (epoch, client time) pairs.
//! Run with `cargo fuzz run portmap_decode`.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use portmap::{EpochTracker, pcp, pmp};

fuzz_target!(|data: &[u8]| {
    if pmp::decode_response(data).is_ok() {
        assert!(data.len() >= pmp::HEADER_LEN);
    }
    if let Ok(response) = pcp::decode_response(data) {
        assert!(data.len() >= pcp::HEADER_LEN && data.len() <= pcp::MAX_MESSAGE_LEN);
        assert!(data.len().is_multiple_of(4));
        assert!(response.is_success() || response.result.code() != 0);
        let options: usize = response.options.iter().map(|o| 4 + o.data.len()).sum();
        assert!(options <= data.len() - pcp::HEADER_LEN);
    }
    if let Ok(announcement) = portmap::decode_announcement(data) {
        assert!(data.len() >= 12);
        let _ = announcement.epoch();
    }

    for rule in [portmap::Rule::Pcp, portmap::Rule::NatPmp] {
        let mut tracker = EpochTracker::new(rule);
        for chunk in data.chunks_exact(12) {
            let (epoch, secs) = chunk.split_at(4);
            let epoch = u32::from_be_bytes(epoch.try_into().expect("4 bytes"));
            let secs = u64::from_be_bytes(secs.try_into().expect("8 bytes"));
            let _ = tracker.observe(epoch, Duration::from_secs(secs));
        }
    }
});
