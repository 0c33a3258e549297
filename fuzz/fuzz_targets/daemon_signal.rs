//! What the daemons say to each other, on any bytes: the message reader and parser of the
//! daemons' stream, the UDP punch's datagrams and the TCP technique's hello. No panic, at most
//! one message held, and a message that parses encodes to a line that parses back the same.
#![no_main]

use daemon::signal::{MAX_MESSAGE, MessageReader, decode, encode};
use daemon::technique::tcp::Hello;
use daemon::technique::udp::Datagram;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Datagram::decode(data);
    let _ = Hello::decode(data);
    if let Ok(message) = decode(data) {
        let line = encode(&message);
        let again = decode(line.strip_suffix(b"\n").unwrap_or(&line));
        assert_eq!(again.as_ref(), Ok(&message));
    }
    let mut reader = MessageReader::default();
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(size) {
        reader.push(chunk);
        while let Ok(Some(_)) = reader.next_message() {}
        if reader.next_message().is_err() {
            break;
        }
    }
    assert!(reader.into_rest().len() <= MAX_MESSAGE + data.len());
});
