//! The multiaddr and peer-ID codec against vectors written by rust-libp2p's `multiaddr` 0.19.1
//! and `libp2p-identity` 0.3.1 (binary form in hex, then the text those crates show). The codec
//! was also compared with those crates on a few hundred thousand random and mutated addresses
//! outside this repository (they are libp2p crates, which this crate does not depend on); these
//! vectors keep that comparison.

use api::multiaddr::{Multiaddr, MultiaddrError};
use api::peer_id::PeerId;

/// (binary form in hex, text form), one per protocol the codec reads and a few combinations.
const VECTORS: [(&str, &str); 29] = [
    (
        "040102030491020fa1cd03a50326002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22ca202",
        "/ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7/p2p-circuit",
    ),
    (
        "04c6336407060fa1a50322122006b3608aa000274049eb28ad8e793a26ff6fab281a7d3bd77cd18eb745dfaabb",
        "/ip4/198.51.100.7/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
    ),
    ("04c0a80102060fa1", "/ip4/192.168.1.2/tcp/4001"),
    ("04c0a8010291020fa1cc03", "/ip4/192.168.1.2/udp/4001/quic"),
    (
        "2900000000000000000000000000000001060fa1",
        "/ip6/::1/tcp/4001",
    ),
    (
        "2920010db800000000000000000000000191020fa1cd03d103d203221220c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2d203221220c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2",
        "/ip6/2001:db8::1/udp/4001/quic-v1/webtransport/certhash/uEiDDq4_xNyDorZBH3TlGazyJdOWSwvo4PUo5YHFMrvDE8g/certhash/uEiDDq4_xNyDorZBH3TlGazyJdOWSwvo4PUo5YHFMrvDE8g",
    ),
    (
        "29fe80000000000000000000000000000191020fa19802d203221220c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2",
        "/ip6/fe80::1/udp/4001/webrtc-direct/certhash/uEiDDq4_xNyDorZBH3TlGazyJdOWSwvo4PUo5YHFMrvDE8g",
    ),
    (
        "350b6578616d706c652e636f6d0601bbde03",
        "/dns/example.com/tcp/443/wss",
    ),
    (
        "361172656c61792e6578616d706c652e6f72670601bbc003c1031172656c61792e6578616d706c652e6f7267dd03",
        "/dns4/relay.example.org/tcp/443/tls/sni/relay.example.org/ws",
    ),
    (
        "370b6578616d706c652e636f6d910201bbcd03",
        "/dns6/example.com/udp/443/quic-v1",
    ),
    (
        "3813626f6f7473747261702e6c69627032702e696fa50322122006b3608aa000274049eb28ad8e793a26ff6fab281a7d3bd77cd18eb745dfaabb",
        "/dnsaddr/bootstrap.libp2p.io/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
    ),
    ("040a000001060050e003", "/ip4/10.0.0.1/tcp/80/http"),
    ("040a0000010601bbbb03", "/ip4/10.0.0.1/tcp/443/https"),
    (
        "040a0000010601bbc003e003e10305612f622063",
        "/ip4/10.0.0.1/tcp/443/tls/http/http-path/a%2Fb%20c",
    ),
    ("040a000001060001c603", "/ip4/10.0.0.1/tcp/1/noise"),
    ("040a000001060001dd03", "/ip4/10.0.0.1/tcp/1/ws"),
    (
        "a50326002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22ca2029902a50322122006b3608aa000274049eb28ad8e793a26ff6fab281a7d3bd77cd18eb745dfaabb",
        "/p2p/12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7/p2p-circuit/webrtc/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
    ),
    (
        "2a046574683029fe800000000000000000000000000001060001",
        "/ip6zone/eth0/ip6/fe80::1/tcp/1",
    ),
    ("040a0000002b08", "/ip4/10.0.0.0/ipcidr/8"),
    ("890600000000000004d2", "/memory/1234"),
    (
        "bc039a18087306369043091f04d2",
        "/onion/timaq4ygg2iegci7:1234",
    ),
    (
        "bd03adadec040be047f9658668b11a504f3155001f231a37f54c4476c07fb4cc139ed7e30304d2",
        "/onion3/vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd:1234",
    ),
    ("900308746d702e736f636b", "/unix/tmp.sock"),
    (
        "0401020304060001a225082f706174682f746f",
        "/ip4/1.2.3.4/tcp/1/x-parity-ws/%2Fpath%2Fto",
    ),
    (
        "0401020304060001ac25022f70",
        "/ip4/1.2.3.4/tcp/1/x-parity-wss/%2Fp",
    ),
    (
        "040102030484010005210006ad02ae02",
        "/ip4/1.2.3.4/sctp/5/dccp/6/udt/utp",
    ),
    (
        "93029402df039502",
        "/p2p-webrtc-star/p2p-webrtc-direct/p2p-websocket-star/p2p-stardust",
    ),
    ("", ""),
    ("ad02de03", "/udt/wss"),
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).expect("two digits"), 16).expect("hex"))
        .collect()
}

#[test]
fn binary_and_text_forms_match_rust_libp2p() {
    for (bytes, text) in VECTORS {
        let bytes = hex(bytes);
        let read = Multiaddr::from_bytes(&bytes).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(read.to_string(), text);
        let parsed: Multiaddr = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(parsed.as_bytes(), &bytes[..], "{text}");
    }
}

#[test]
fn an_ed25519_peer_id_shows_as_libp2p_shows_it() {
    // libp2p-identity's peer ID of the Ed25519 key whose secret is 32 bytes of 7.
    let bytes = hex("002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c");
    let text = "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7";
    let id = PeerId::from_bytes(&bytes).expect("peer id");
    assert_eq!(id.to_string(), text);
    assert_eq!(text.parse::<PeerId>().expect("text"), id);
    let key = <[u8; 32]>::try_from(&bytes[6..]).expect("key");
    assert_eq!(PeerId::ed25519(key), id);
}

#[test]
fn malformed_addresses_are_refused_naming_the_problem() {
    let refused = |bytes: &[u8]| {
        Multiaddr::from_bytes(bytes)
            .expect_err("refused")
            .to_string()
    };
    assert_eq!(refused(&[0xff, 0x7f]), "unknown protocol code 16383");
    assert_eq!(refused(&[0x04, 1, 2, 3]), "/ip4: value cut short");
    assert_eq!(refused(&[0x06, 0x0f]), "/tcp: value cut short");
    assert_eq!(refused(&[0x80]), "at byte 0: a varint is cut short");
    assert_eq!(
        refused(&[0x06, 0x0f, 0xa1, 0x81, 0x00]),
        "at byte 3: a varint is not minimally encoded"
    );
    // A length far beyond the input is refused before anything is allocated for it.
    assert_eq!(
        refused(&[0x35, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a']),
        "/dns: value cut short"
    );
    assert_eq!(refused(&[0x35, 0x01, 0xff]), "/dns: not UTF-8");
    assert_eq!(refused(&[0x35, 0x03, b'a', b'/', b'b']), "/dns: contains /");
    assert_eq!(
        refused(&[0xa5, 0x03, 0x03, 0x13, 0x01, 0x00]),
        "/p2p: not a peer ID: multihash code 0x13 is neither identity (0x00) nor sha2-256 (0x12)"
    );
    let parse_err = |s: &str| s.parse::<Multiaddr>().expect_err("refused");
    assert_eq!(
        parse_err("/ip4/1.2.3.4/udp/4001/quic-v2"),
        MultiaddrError::UnknownName("quic-v2".into())
    );
    assert_eq!(parse_err("ip4/1.2.3.4"), MultiaddrError::NoLeadingSlash);
    assert_eq!(parse_err("/tcp"), MultiaddrError::Truncated("tcp"));
    assert_eq!(parse_err("/tcp/65536").to_string(), "/tcp: not a port");
    assert!(parse_err("/").to_string().contains("unknown protocol name"));
}

#[test]
fn what_reads_also_reads_back_from_its_text() {
    // Every prefix and every one-byte change of the vectors: whatever reads shows text that
    // reads back to the same bytes.
    for (bytes, _) in VECTORS {
        let bytes = hex(bytes);
        for end in 0..=bytes.len() {
            for flip in 0..=end {
                let mut b = bytes[..end].to_vec();
                if let Some(x) = b.get_mut(flip) {
                    *x ^= 0x5a;
                }
                if let Ok(m) = Multiaddr::from_bytes(&b) {
                    let back: Multiaddr = m.to_string().parse().expect("reads back");
                    assert_eq!(back, m, "{m}");
                }
            }
        }
    }
}
