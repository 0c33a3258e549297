//! The client's constants, each with the reason for its value.

use std::time::Duration;

/// The longest event line the client holds, newline excluded: the API's line limit (64 KiB,
/// `docs/daemon-api.md`) plus 4 KiB of slack for the fields a newer daemon of the same version
/// may add around a long value. A longer line is skipped and reported, so a broken daemon
/// cannot make the client's buffer grow without end.
pub const MAX_EVENT_LINE: usize = 64 * 1024 + 4 * 1024;

/// Bytes read from the daemon's socket per `recvmsg`: a whole status or offer event in one read
/// most of the time, and small beside [`MAX_EVENT_LINE`].
pub const READ_CHUNK: usize = 16 * 1024;

/// The first bytes of a broken line that an error shows: enough to recognise it, short enough
/// for one terminal line or two.
pub const SHOWN_LINE: usize = 200;

/// Bytes a stream bridge moves per read: 64 KiB, 16 reads per MiB of a bulk transfer (scp over
/// ssh), and 128 KiB of memory for the two directions.
pub const COPY_CHUNK: usize = 64 * 1024;

/// The service asked for when none is named: the API's own default.
pub const SERVICE: &str = "default";

/// The largest datagram a UDP bridge reads from its input: the most a UDP payload can carry
/// over IPv4 (65,535 − 8 − 20).
pub const MAX_DATAGRAM: usize = 65_507;

/// How long a UDP bridge keeps printing what arrives after its input ended, once nothing more
/// arrives: UDP has no close, so answers to the last datagrams sent get this long (two seconds,
/// above the round trip of any path a punch or a relay gives).
pub const UDP_LINGER: Duration = Duration::from_secs(2);

/// How often a UDP bridge that waits for datagrams looks whether its input has ended.
pub const UDP_POLL: Duration = Duration::from_millis(100);
