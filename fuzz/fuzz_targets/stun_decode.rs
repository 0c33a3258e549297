//! Datagrams reach the STUN server and client from anyone: decoding, response parsing and the
//! server's handling must never panic, and every datagram must be counted exactly once.
//! Run with `cargo fuzz run stun_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stun::decode(data);
    let _ = stun::parse_binding_response(data);
    let _ = stun::message::binding_request_id(data);
    let local = "11.99.0.11:3478".parse().expect("address");
    let mut server = stun::Server::new(local, "11.99.0.12:3479".parse().expect("address"), "fuzz")
        .expect("valid server");
    let _ = server.handle(local, "11.99.0.10:40000".parse().expect("address"), data);
    assert_eq!(server.counters().total(), 1);
});
