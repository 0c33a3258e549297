//! The remote's NAT is read from the addresses the relay and the honeypot saw, which the
//! network chose: any text must give one of the three answers without panicking, and the
//! answer must not depend on the order the observations come in. Run with `cargo fuzz run
//! vantage_observations`.
#![no_main]

use api::vantage::{ENDPOINT_DEPENDENT, ENDPOINT_INDEPENDENT, Observation, UNKNOWN, remote_nat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // One observation per line: the observer is the line's first byte, the time its number.
    let observations: Vec<Observation> = text
        .lines()
        .enumerate()
        .map(|(k, line)| Observation {
            observer: i64::from(line.bytes().next().unwrap_or(0) % 4),
            addr: line.get(1..).unwrap_or_default().to_owned(),
            at: i64::try_from(k).unwrap_or(0),
        })
        .collect();
    let verdict = remote_nat(&observations);
    assert!([ENDPOINT_INDEPENDENT, ENDPOINT_DEPENDENT, UNKNOWN].contains(&verdict));
    let mut reversed = observations.clone();
    reversed.reverse();
    assert_eq!(remote_nat(&reversed), verdict);
});
