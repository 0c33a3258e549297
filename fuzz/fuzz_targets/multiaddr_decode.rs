//! Every report carries multiaddrs and peer IDs in their binary form, from anyone with an API
//! key: reading them must never panic, and whatever reads must show text that reads back to the
//! same bytes (the store keeps the text; GetAddrInfo turns it back into bytes). Text is read
//! too, as the store's addresses are. Run with `cargo fuzz run multiaddr_decode`.
#![no_main]

use api::multiaddr::Multiaddr;
use api::peer_id::PeerId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(addr) = Multiaddr::from_bytes(data) {
        let text = addr.to_string();
        let back: Multiaddr = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back.as_bytes(), data, "{text}");
    }
    if let Ok(id) = PeerId::from_bytes(data) {
        let back: PeerId = id.to_string().parse().expect("a peer ID's text reads back");
        assert_eq!(back.as_bytes(), data);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(addr) = text.parse::<Multiaddr>()
    {
        let shown = addr.to_string();
        let again: Multiaddr = shown.parse().unwrap_or_else(|e| panic!("{shown}: {e}"));
        assert_eq!(again, addr, "{text} shows as {shown}");
    }
});
