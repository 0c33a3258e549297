//! natpunch-client's event reader on any bytes, cut anywhere, with descriptors on any reads: no
//! panic, at most one line and one descriptor held, each descriptor given out once and only
//! with an `ok` line that announces one.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use natpunch_client::defaults::MAX_EVENT_LINE;
use natpunch_client::wire::{Event, EventReader, Incoming};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, as a socket would cut the stream; the second which
    // reads bring a descriptor.
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let with_fd = data.get(1).copied().unwrap_or(0);
    let mut reader = EventReader::default();
    let mut given = BTreeSet::new();
    for (i, chunk) in data.chunks(size).enumerate() {
        let fd = (with_fd & (1 << (i % 8)) != 0).then_some(i);
        for incoming in reader.push(chunk, fd) {
            if let Incoming::Event { reply, fd: Some(fd) } = incoming {
                assert!(matches!(reply.event, Event::Ok(ref ready) if ready.fd));
                assert!(given.insert(fd), "descriptor {fd} given twice");
            }
        }
        assert!(reader.buffered() <= MAX_EVENT_LINE + 1);
        assert!(reader.held_fds() <= 1);
    }
});
