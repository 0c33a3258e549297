//! Topology files come from users: parsing and planning must reject bad input with an error,
//! never panic. Run with `cargo fuzz run topology` (seed corpus: `examples/labs/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(topology) = natlab::Topology::from_toml(text) {
        let plan = topology.plan("fuzz").expect("a validated topology always has a plan");
        assert_eq!(plan.nodes.len(), topology.nodes.len());
    }
});
