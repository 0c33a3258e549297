//! DCUtR messages come from the remote peer over a relayed stream: decoding a body and
//! splitting a byte stream into frames must never panic, whatever the bytes and however they
//! are chunked, and every message accepted must survive re-encoding unchanged, natpunch's
//! `reversed` and `mapping` fields (1000 and 1001, `/natpunch/dcutr/1.1.0`) included: a class
//! set on an accepted message round-trips too, whatever the rest of the message.
//! Run with `cargo fuzz run dcutr_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use behaviour::Mapping;
use p2p::wire::{FrameReader, HolePunch, MAX_MESSAGE};

/// Every class the `mapping` field carries.
const CLASSES: [Mapping; 4] = [
    Mapping::None,
    Mapping::EndpointIndependent,
    Mapping::AddressDependent,
    Mapping::AddressAndPortDependent,
];

/// Every accepted message re-encodes canonically, within the limit, to itself.
fn check(m: &HolePunch) {
    let body = m.encode();
    assert!(body.len() <= MAX_MESSAGE);
    assert_eq!(HolePunch::decode(&body).as_ref(), Ok(m));
    let frame = m.to_frame().expect("a decoded message fits in a frame");
    let mut reader = FrameReader::new();
    reader.push(&frame);
    assert_eq!(reader.next_message(), Ok(Some(m.clone())));
    assert_eq!(reader.buffered(), 0);
}

/// Splits `chunks` into frames; the messages decoded, in order.
fn frames(chunks: &[&[u8]]) -> Vec<HolePunch> {
    let mut reader = FrameReader::new();
    let mut messages = Vec::new();
    for chunk in chunks {
        reader.push(chunk);
        loop {
            match reader.next_message() {
                Ok(Some(m)) => {
                    check(&m);
                    messages.push(m);
                }
                Ok(None) => break,
                // A bad body consumes its frame, so the loop advances; a bad prefix or an
                // oversized frame is fatal and empties the reader.
                Err(_) if reader.buffered() == 0 => break,
                Err(_) => {}
            }
        }
    }
    messages
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = HolePunch::decode(data) {
        assert!(data.len() <= MAX_MESSAGE);
        assert!(m.encode().len() <= data.len());
        check(&m);
        // The input's first byte picks a class to set (or to clear): it round-trips.
        let mut classed = m.clone();
        classed.mapping = data
            .first()
            .and_then(|&b| CLASSES.get(usize::from(b) % (CLASSES.len() + 1)))
            .copied();
        if classed.encode().len() <= MAX_MESSAGE {
            check(&classed);
        }
    }

    let split = data.first().map_or(0, |&b| usize::from(b) % data.len());
    let (head, tail) = data.split_at(split);
    assert_eq!(frames(&[head, tail]), frames(&[data]));
});
