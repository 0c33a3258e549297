//! The daemon's request reader and parser on any bytes: no panic, at most one line held, and
//! every rejection answered with a line that is valid JSON.
#![no_main]

use daemon::api::{LineReader, MAX_LINE, rejection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = LineReader::default();
    // The first byte picks the chunk size, as a socket would cut the stream.
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(size) {
        for line in reader.push(chunk) {
            if let Some(rejected) = rejection(&line) {
                let reply = rejected.reply().to_line();
                assert!(serde_json::from_slice::<serde_json::Value>(&reply).is_ok());
            }
        }
        assert!(reader.buffered() <= MAX_LINE + 1);
    }
});
