//! The PROXY protocol layer: headers over scripted streams (every split point, paused
//! time) and over real loopback sockets.
#![cfg(feature = "proxy-protocol")]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::error::{BoxError, find, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{capture, counter, run};
use aegis_core::{ClientAddr, Conn, Handshake, LocalAddr, Param, PeerAddr};
use aegis_layers::proxy_protocol::{
    CONNECTIONS_TOTAL, HeaderMode, ProxiedIo, ProxyHeader, ProxyProtocolError, ProxyProtocolLayer,
};
use metrics_util::debugging::Snapshotter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_test::io::{Builder, Mock};
use tower::{Layer, ServiceExt, service_fn};

const LB: &str = "10.1.2.3:40000";
const LOCAL: &str = "10.1.2.4:1883";
const PAYLOAD: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c after the header";

const V1_TCP4: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 1883\r\n";
const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 1883\r\n";
const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";
/// Whatever follows `UNKNOWN` is ignored, however many words.
const V1_UNKNOWN_WORDS: &[u8] = b"PROXY UNKNOWN a b c d e\r\n";
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn v2_ipv4(src: [u8; 4], tlvs: &[u8]) -> Vec<u8> {
    let mut p = src.to_vec();
    p.extend_from_slice(&[192, 0, 2, 1]);
    p.extend_from_slice(&51000u16.to_be_bytes());
    p.extend_from_slice(&1883u16.to_be_bytes());
    p.extend_from_slice(tlvs);
    v2(1, 0x11, &p)
}

fn v2_ipv6() -> Vec<u8> {
    let src: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let dst: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let mut p = src.octets().to_vec();
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&51000u16.to_be_bytes());
    p.extend_from_slice(&1883u16.to_be_bytes());
    v2(1, 0x21, &p)
}

/// Authority "mqtt.example" and a unique id.
const TLVS: &[u8] = b"\x02\x00\x0cmqtt.example\x05\x00\x03abc";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What the inner service saw.
#[derive(Debug, PartialEq)]
struct Seen {
    client: SocketAddr,
    peer: SocketAddr,
    local: SocketAddr,
    version: Option<u8>,
    local_cmd: bool,
    destination: Option<SocketAddr>,
    authority: Option<Vec<u8>>,
    data: Vec<u8>,
}

/// The layer around an inner service that records what it saw and reads to EOF.
async fn serve<I>(layer: &ProxyProtocolLayer, io: I) -> Result<Seen, BoxError>
where
    I: AsyncRead + Unpin + Param<PeerAddr> + Param<LocalAddr> + Param<ClientAddr>,
{
    let svc = layer.layer(service_fn(|mut io: ProxiedIo<I>| async move {
        let mut data = Vec::new();
        io.read_to_end(&mut data).await?;
        let h = io.header();
        Ok::<_, io::Error>(Seen {
            client: Param::<ClientAddr>::param(&io).0,
            peer: Param::<PeerAddr>::param(&io).0,
            local: Param::<LocalAddr>::param(&io).0,
            version: h.map(ProxyHeader::version),
            local_cmd: h.is_some_and(ProxyHeader::is_local),
            destination: h.and_then(ProxyHeader::destination),
            authority: h.and_then(|h| h.tlv(0x02)).map(<[u8]>::to_vec),
            data,
        })
    }));
    svc.oneshot(io).await
}

fn trusting_lb() -> ProxyProtocolLayer {
    ProxyProtocolLayer::new(["10.0.0.0/8".parse().unwrap()])
}

fn conn(mock: Mock, peer: &str) -> Conn<Mock> {
    Conn::new(mock, addr(peer), addr(LOCAL))
}

/// Asserts a rejection with `reason`, counted exactly once.
fn assert_rejected(res: Result<Seen, BoxError>, snap: &Snapshotter, reason: &str) {
    let err = res.expect_err("expected a rejection");
    assert_eq!(label_of(&*err), ("proxy_protocol", reason), "{err}");
    assert!(find::<ProxyProtocolError>(&*err).is_some());
    let labels = [("layer", "proxy_protocol"), ("reason", reason)];
    assert_eq!(
        counter(snap, REJECTIONS_TOTAL, &labels),
        1,
        "{reason} counted once"
    );
}

fn header_with_payload(header: &[u8]) -> Vec<u8> {
    [header, PAYLOAD].concat()
}

/// One header the layer accepts, and what the inner service must see.
struct Case {
    name: &'static str,
    header: Vec<u8>,
    client: SocketAddr,
    version: u8,
    /// `None` for headers without addresses (LOCAL, UNKNOWN).
    destination: Option<SocketAddr>,
}

fn accepted_cases() -> Vec<Case> {
    let case = |name, header: Vec<u8>, client: &str, version, destination: Option<&str>| Case {
        name,
        header,
        client: addr(client),
        version,
        destination: destination.map(addr),
    };
    let (v4, v6) = ("203.0.113.7:51000", "[2001:db8::7]:51000");
    let (d4, d6) = (Some("192.0.2.1:1883"), Some("[2001:db8::1]:1883"));
    vec![
        case("v1 tcp4", V1_TCP4.to_vec(), v4, 1, d4),
        case("v1 tcp6", V1_TCP6.to_vec(), v6, 1, d6),
        case("v1 unknown", V1_UNKNOWN.to_vec(), LB, 1, None),
        case("v1 unknown, words", V1_UNKNOWN_WORDS.to_vec(), LB, 1, None),
        case("v2 ipv4", v2_ipv4([203, 0, 113, 7], &[]), v4, 2, d4),
        case("v2 ipv6", v2_ipv6(), v6, 2, d6),
        case("v2 local", v2(0, 0x00, &[]), LB, 2, None),
        case("v2 tlvs", v2_ipv4([203, 0, 113, 7], TLVS), v4, 2, d4),
    ]
}

#[tokio::test]
async fn accepts_every_header_kind_and_replays_the_data() {
    for c in accepted_cases() {
        let io = Builder::new().read(&header_with_payload(&c.header)).build();
        let seen = serve(&trusting_lb(), conn(io, LB)).await.unwrap();
        let name = c.name;
        assert_eq!(seen.client, c.client, "{name}");
        assert_eq!((seen.peer, seen.local), (addr(LB), addr(LOCAL)), "{name}");
        assert_eq!(seen.version, Some(c.version), "{name}");
        assert_eq!(seen.destination, c.destination, "{name}");
        assert_eq!(seen.local_cmd, c.destination.is_none(), "{name}");
        assert_eq!(seen.data, PAYLOAD, "{name}");
    }
}

#[tokio::test]
async fn exposes_tlvs() {
    let io = Builder::new()
        .read(&header_with_payload(&v2_ipv4([203, 0, 113, 7], TLVS)))
        .build();
    let seen = serve(&trusting_lb(), conn(io, LB)).await.unwrap();
    assert_eq!(seen.authority.as_deref(), Some(&b"mqtt.example"[..]));
}

#[tokio::test]
async fn every_split_point_and_byte_by_byte() {
    for Case {
        name,
        header,
        client,
        ..
    } in accepted_cases()
    {
        let full = header_with_payload(&header);
        for i in 1..header.len() {
            let io = Builder::new().read(&full[..i]).read(&full[i..]).build();
            let seen = serve(&trusting_lb(), conn(io, LB)).await.unwrap();
            assert_eq!(
                (seen.client, &seen.data[..]),
                (client, PAYLOAD),
                "{name} split at {i}"
            );
        }
        let mut b = Builder::new();
        for byte in header.chunks(1) {
            b.read(byte);
        }
        b.read(PAYLOAD);
        let seen = serve(&trusting_lb(), conn(b.build(), LB)).await.unwrap();
        assert_eq!(
            (seen.client, &seen.data[..]),
            (client, PAYLOAD),
            "{name} byte by byte"
        );
    }
}

#[test]
fn accepted_connections_are_counted_by_outcome() {
    let ((), snap) = run(false, || async {
        for c in accepted_cases() {
            let io = Builder::new().read(&c.header).build();
            serve(&trusting_lb(), conn(io, LB)).await.unwrap();
        }
        let io = Builder::new().read(PAYLOAD).build();
        serve(&trusting_lb(), conn(io, "192.0.2.99:1000"))
            .await
            .unwrap();
    });
    let got = capture(&snap);
    let count = |outcome| got.counter(CONNECTIONS_TOTAL, &[("outcome", outcome)]);
    assert_eq!(count("proxied_v1"), 2);
    assert_eq!(count("proxied_v2"), 3);
    assert_eq!(count("local"), 3);
    assert_eq!(count("passthrough"), 1);
    assert_eq!(got.counter(REJECTIONS_TOTAL, &[]), 0);
}

#[tokio::test]
async fn untrusted_peer_with_plain_bytes_passes_untouched() {
    // Starts like a PROXY header for two bytes, then diverges ("POST").
    let data = b"POST / HTTP/1.1\r\n\r\n";
    let io = Builder::new()
        .read(b"P")
        .read(b"O")
        .read(&data[2..])
        .build();
    let seen = serve(&trusting_lb(), conn(io, "192.0.2.99:1000"))
        .await
        .unwrap();
    assert_eq!(seen.client, addr("192.0.2.99:1000"));
    assert_eq!(seen.data, data);
    assert_eq!(seen.version, None);
}

/// A PROXY header from a peer outside the trusted networks is neither believed nor
/// refused: it reaches the inner service as data, byte for byte, with the peer as the
/// client (a protocol layer inside refuses it: the sniffer as `proxy`).
#[test]
fn untrusted_peer_with_a_header_passes_it_on_unread() {
    for header in [V1_TCP4.to_vec(), v2_ipv4([203, 0, 113, 7], &[])] {
        let (res, snap) = run(false, || async {
            let io = Builder::new().read(&header_with_payload(&header)).build();
            serve(&trusting_lb(), conn(io, "192.0.2.99:1000")).await
        });
        let seen = res.unwrap();
        assert_eq!(
            (seen.client, seen.version, &seen.data[..]),
            (
                addr("192.0.2.99:1000"),
                None,
                &header_with_payload(&header)[..]
            )
        );
        let got = capture(&snap);
        assert_eq!(got.counter(REJECTIONS_TOTAL, &[]), 0);
        assert_eq!(
            got.counter(CONNECTIONS_TOTAL, &[("outcome", "passthrough")]),
            1
        );
    }
}

#[test]
fn ipv4_mapped_peer_is_matched_as_ipv4() {
    let (res, _) = run(false, || async {
        let io = Builder::new().read(&header_with_payload(V1_TCP4)).build();
        serve(&trusting_lb(), conn(io, "[::ffff:10.1.2.3]:40000")).await
    });
    assert_eq!(res.unwrap().client, addr("203.0.113.7:51000"));
    // And a mapped address outside the network stays untrusted: its header is data.
    let (res, _) = run(false, || async {
        let io = Builder::new().read(V1_TCP4).build();
        serve(&trusting_lb(), conn(io, "[::ffff:192.0.2.99]:40000")).await
    });
    let seen = res.unwrap();
    assert_eq!(
        (seen.client, seen.version, &seen.data[..]),
        (addr("[::ffff:192.0.2.99]:40000"), None, V1_TCP4)
    );
}

/// A trusted network written in IPv4-mapped form, as a dual-stack socket shows its
/// peers, is the IPv4 network it holds: peers are folded to IPv4 before they are
/// matched, so the mapped form never matched, and every connection of the balancer was
/// taken for its own client, its header for data.
#[test]
fn a_trusted_network_in_ipv4_mapped_form_is_matched_as_ipv4() {
    let layer = ProxyProtocolLayer::new([
        "::ffff:10.1.2.3/128".parse().unwrap(),
        "::ffff:192.0.2.0/120".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ]);
    assert_eq!(
        layer.trusted(),
        [
            "10.1.2.3/32".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]
    );
    for peer in [
        LB,
        "[::ffff:10.1.2.3]:40000",
        "192.0.2.200:1",
        "[2001:db8::9]:1",
    ] {
        let (res, _) = run(false, || async {
            let io = Builder::new().read(&header_with_payload(V1_TCP4)).build();
            serve(&layer, conn(io, peer)).await
        });
        let seen = res.unwrap();
        assert_eq!(
            (seen.client, &seen.data[..]),
            (addr("203.0.113.7:51000"), PAYLOAD),
            "{peer}"
        );
    }
    // Another peer stays untrusted: its header is data.
    let (res, _) = run(false, || async {
        let io = Builder::new().read(V1_TCP4).build();
        serve(&layer, conn(io, "10.1.2.4:40000")).await
    });
    let seen = res.unwrap();
    assert_eq!(
        (seen.client, seen.version, &seen.data[..]),
        (addr("10.1.2.4:40000"), None, V1_TCP4)
    );
}

/// The same over a real loopback socket: the peer 127.0.0.1, trusted as
/// `::ffff:127.0.0.1/128`, sends a header that is believed.
#[tokio::test]
async fn a_loopback_balancer_trusted_in_ipv4_mapped_form_is_believed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let layer = ProxyProtocolLayer::new(["::ffff:127.0.0.1/128".parse().unwrap()]);
    let task = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let local = stream.local_addr().unwrap();
        serve(&layer, Conn::new(stream, peer, local)).await
    });
    let mut client = tokio::net::TcpStream::connect(server).await.unwrap();
    client
        .write_all(&header_with_payload(&v2_ipv4([203, 0, 113, 7], &[])))
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let seen = task.await.unwrap().unwrap();
    assert_eq!(
        (seen.client, seen.version, &seen.data[..]),
        (addr("203.0.113.7:51000"), Some(2), PAYLOAD)
    );
}

#[test]
fn trusted_peer_without_header_is_missing_unless_optional() {
    let (res, snap) = run(false, || async {
        serve(
            &trusting_lb(),
            conn(Builder::new().read(PAYLOAD).build(), LB),
        )
        .await
    });
    assert_rejected(res, &snap, "missing");

    let optional = trusting_lb().mode(HeaderMode::Optional);
    let (res, _) = run(false, || async {
        serve(&optional, conn(Builder::new().read(PAYLOAD).build(), LB)).await
    });
    let seen = res.unwrap();
    assert_eq!((seen.client, &seen.data[..]), (addr(LB), PAYLOAD));
}

#[test]
fn garbage_is_invalid() {
    let cases: Vec<Vec<u8>> = vec![
        b"PROXY TCP5 203.0.113.7 192.0.2.1 51000 1883\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.999 192.0.2.1 51000 1883\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 1883\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 051000 1883\r\n".to_vec(),
        b"PROXY \xff\xfe\r\n".to_vec(),
        v2(3, 0x11, &[0; 12]),                           // command 3
        v2(1, 0x41, &[0; 12]),                           // family 4
        v2(1, 0x11, &[0; 4]),                            // too short for IPv4 addresses
        v2_ipv4([203, 0, 113, 7], b"\x02\x00\x09short"), // truncated TLV
        {
            let mut h = v2_ipv4([203, 0, 113, 7], &[]);
            h[12] = 0x11; // version 1 in a binary header
            h
        },
    ];
    for bad in cases {
        let (res, snap) = run(false, || async {
            serve(&trusting_lb(), conn(Builder::new().read(&bad).build(), LB)).await
        });
        assert_rejected(res, &snap, "invalid");
    }
}

#[test]
fn truncated_header_is_eof() {
    for Case { name, header, .. } in accepted_cases() {
        for cut in [1, header.len() / 2, header.len() - 1] {
            let (res, snap) = run(false, || async {
                serve(
                    &trusting_lb(),
                    conn(Builder::new().read(&header[..cut]).build(), LB),
                )
                .await
            });
            let err = res.as_ref().map(|_| ()).expect_err(name);
            assert!(
                err.to_string().contains(&format!("after {cut} bytes")),
                "{err}"
            );
            assert_rejected(res, &snap, "eof");
        }
    }
}

#[test]
fn oversized_headers_are_too_long_without_reading_them() {
    // A v2 header declaring 1000 bytes: refused from its 16 bytes, before its payload.
    let mut big = v2_ipv4([203, 0, 113, 7], &[]);
    big[14..16].copy_from_slice(&1000u16.to_be_bytes());
    let (res, snap) = run(false, || async {
        serve(
            &trusting_lb(),
            conn(Builder::new().read(&big[..16]).build(), LB),
        )
        .await
    });
    assert_rejected(res, &snap, "too_long");

    // Within a raised cap, the same header is read to its end (TLV of 985 bytes).
    let mut tlv = vec![0x04, 0x03, 0xD9];
    tlv.resize(3 + 985, 0);
    let large = v2_ipv4([203, 0, 113, 7], &tlv);
    assert_eq!(large.len(), 16 + 1000);
    let raised = trusting_lb().max_header_len(2048);
    let (res, _) = run(false, || async {
        serve(
            &raised,
            conn(
                Builder::new().read(&header_with_payload(&large)).build(),
                LB,
            ),
        )
        .await
    });
    assert_eq!(res.unwrap().data, PAYLOAD);

    // A v1 line without its LF within 107 bytes.
    let mut long = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 1883".to_vec();
    long.resize(107, b' ');
    let (res, snap) = run(false, || async {
        serve(&raised, conn(Builder::new().read(&long).build(), LB)).await
    });
    assert_rejected(res, &snap, "too_long");
}

#[test]
fn slow_header_hits_the_deadline() {
    let (res, snap) = run(true, || async {
        let io = Builder::new()
            .read(b"PROXY TCP4 203.0")
            .wait(Duration::from_secs(60))
            .build();
        let start = tokio::time::Instant::now();
        let res = serve(&trusting_lb(), conn(io, LB)).await;
        let waited = tokio::time::Instant::now().saturating_duration_since(start);
        assert_eq!(waited, Duration::from_secs(3), "the default deadline");
        res
    });
    assert_rejected(res, &snap, "timeout");

    // A custom deadline, and a silent trusted peer.
    let (res, snap) = run(true, || async {
        let io = Builder::new().wait(Duration::from_secs(60)).build();
        let start = tokio::time::Instant::now();
        let res = serve(
            &trusting_lb().timeout(Duration::from_millis(500)),
            conn(io, LB),
        )
        .await;
        let waited = tokio::time::Instant::now().saturating_duration_since(start);
        assert_eq!(waited, Duration::from_millis(500));
        res
    });
    assert_rejected(res, &snap, "timeout");
}

#[test]
fn optional_mode_passes_a_trusted_peer_silent_past_the_deadline() {
    let (res, snap) = run(true, || async {
        // A stream, not a mock: a cut connection is an error here, not a panic on drop.
        let (mut lb, server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            // Fails if the layer has already closed the connection.
            let _ = lb.write_all(PAYLOAD).await;
        });
        let start = tokio::time::Instant::now();
        let optional = trusting_lb().mode(HeaderMode::Optional);
        let res = serve(&optional, Conn::new(server, addr(LB), addr(LOCAL))).await;
        let took = tokio::time::Instant::now().saturating_duration_since(start);
        writer.await.unwrap();
        // Served until the data's EOF at 5 s (a cut shows in `res`, checked below).
        assert!(res.is_err() || took == Duration::from_secs(5), "{took:?}");
        res
    });
    // No header: passed on, client = peer, the later bytes intact.
    let seen = res.unwrap();
    assert_eq!(
        (seen.client, seen.version, &seen.data[..]),
        (addr(LB), None, PAYLOAD)
    );
    let got = capture(&snap);
    assert_eq!(got.counter(REJECTIONS_TOTAL, &[]), 0);
    assert_eq!(
        got.counter(CONNECTIONS_TOTAL, &[("outcome", "passthrough")]),
        1
    );
}

#[test]
fn optional_mode_passes_a_trusted_peer_that_closes_before_a_byte() {
    let optional = trusting_lb().mode(HeaderMode::Optional);
    let (res, snap) = run(true, || async {
        serve(&optional, conn(Builder::new().build(), LB)).await
    });
    let seen = res.unwrap();
    assert_eq!((seen.client, &seen.data[..]), (addr(LB), &b""[..]));
    assert_eq!(capture(&snap).counter(REJECTIONS_TOTAL, &[]), 0);
}

#[test]
fn optional_mode_still_cuts_a_trusted_peer_inside_a_header() {
    // Part of a signature or a header, then a stall or a close: a trusted balancer's
    // fault, cut as in the required mode.
    let optional = trusting_lb().mode(HeaderMode::Optional);
    for partial in [&b"PROXY TCP4 1.2.3.4"[..], b"PRO", V2_SIG] {
        let (res, snap) = run(true, || async {
            let io = Builder::new()
                .read(partial)
                .wait(Duration::from_secs(60))
                .build();
            let start = tokio::time::Instant::now();
            let res = serve(&optional, conn(io, LB)).await;
            let waited = tokio::time::Instant::now().saturating_duration_since(start);
            assert_eq!(waited, Duration::from_secs(3), "the default deadline");
            res
        });
        assert_rejected(res, &snap, "timeout");
        let (res, snap) = run(true, || async {
            serve(&optional, conn(Builder::new().read(partial).build(), LB)).await
        });
        assert_rejected(res, &snap, "eof");
    }
}

/// A peer outside the trusted networks is never waited on: the inner service (where
/// bans, rate limits and per-client caps run) gets it at once, before its first byte,
/// not at the header deadline (a silent peer was held for the whole 3 s there, outside
/// every per-client limit). Its bytes, when they come, reach the inner service
/// untouched: part of a signature, a pause, a PROXY line, data.
#[test]
fn silent_untrusted_peer_is_passed_on_at_once() {
    let header = V1_TCP4;
    let (res, snap) = run(true, || async {
        let io = Builder::new()
            .wait(Duration::from_secs(5))
            .read(&header[..2])
            .wait(Duration::from_secs(5))
            .read(&header_with_payload(header)[2..])
            .build();
        let start = tokio::time::Instant::now();
        let svc = trusting_lb().layer(service_fn(move |mut io: ProxiedIo<Conn<Mock>>| {
            let called = tokio::time::Instant::now().saturating_duration_since(start);
            async move {
                let mut data = Vec::new();
                io.read_to_end(&mut data).await?;
                Ok::<_, io::Error>((called, Param::<ClientAddr>::param(&io).0, data))
            }
        }));
        svc.oneshot(conn(io, "192.0.2.99:1000")).await
    });
    let (called, client, data) = res.unwrap();
    assert_eq!(called, Duration::ZERO, "the inner service was called late");
    assert_eq!(
        (client, &data[..]),
        (addr("192.0.2.99:1000"), &header_with_payload(header)[..])
    );
    let got = capture(&snap);
    assert_eq!(got.counter(REJECTIONS_TOTAL, &[]), 0);
    assert_eq!(
        got.counter(CONNECTIONS_TOTAL, &[("outcome", "passthrough")]),
        1
    );
}

#[test]
fn read_error_is_io() {
    let (res, snap) = run(false, || async {
        let io = Builder::new()
            .read(b"PROXY ")
            .read_error(io::ErrorKind::ConnectionReset.into())
            .build();
        serve(&trusting_lb(), conn(io, LB)).await
    });
    assert_rejected(res, &snap, "io");
}

#[test]
fn every_rejection_drops_the_connection_before_the_inner_service() {
    let (res, _) = run(false, || async {
        let svc = trusting_lb().layer(service_fn(|_io: ProxiedIo<Conn<Mock>>| async {
            panic!("the inner service must not be called");
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        }));
        svc.oneshot(conn(Builder::new().read(b"PROXY TCP5 x\r\n").build(), LB))
            .await
    });
    assert!(res.is_err());
}

/// The layer over real sockets: a v2 header from 127.0.0.1 claiming 203.0.113.7,
/// believed where 127.0.0.0/8 is trusted, data with the peer as the client elsewhere.
#[tokio::test]
async fn loopback_header_sets_the_client_and_an_untrusted_listener_passes_it_as_data() {
    async fn accept_one(
        layer: ProxyProtocolLayer,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<Seen, BoxError>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let local = stream.local_addr().unwrap();
            let svc = layer.layer(service_fn(
                |mut io: ProxiedIo<Conn<tokio::net::TcpStream>>| async move {
                    let mut data = Vec::new();
                    io.read_to_end(&mut data).await?;
                    let client = Param::<ClientAddr>::param(&io).0;
                    let peer = Param::<PeerAddr>::param(&io).0;
                    let local = Param::<LocalAddr>::param(&io).0;
                    assert!(!Param::<Handshake>::param(&io).is_tracked());
                    // Replies go through the wrapper's vectored writes.
                    assert!(
                        io.is_write_vectored(),
                        "TcpStream's vectored writes are forwarded"
                    );
                    let text = client.to_string();
                    let reply = [
                        io::IoSlice::new(b"seen "),
                        io::IoSlice::new(text.as_bytes()),
                    ];
                    let n = io.write_vectored(&reply).await?;
                    io.write_all(&[&b"seen "[..], text.as_bytes()].concat()[n..])
                        .await?;
                    io.shutdown().await?;
                    Ok::<_, io::Error>(Seen {
                        client,
                        peer,
                        local,
                        version: None,
                        local_cmd: false,
                        destination: None,
                        authority: None,
                        data,
                    })
                },
            ));
            svc.oneshot(Conn::new(stream, peer, local)).await
        });
        (addr, task)
    }

    let mut data = vec![0u8; 64 * 1024];
    for (i, b) in data.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap();
    }
    let header = v2_ipv4([203, 0, 113, 7], &[]);

    let (server, task) =
        accept_one(ProxyProtocolLayer::new(["127.0.0.0/8".parse().unwrap()])).await;
    let mut client = tokio::net::TcpStream::connect(server).await.unwrap();
    client.write_all(&header).await.unwrap();
    client.write_all(&data).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.unwrap();
    let seen = task.await.unwrap().unwrap();
    assert_eq!(seen.client, addr("203.0.113.7:51000"));
    assert_eq!(seen.peer, client.local_addr().unwrap());
    assert_eq!(seen.local, server);
    assert!(seen.data == data, "data after the header is byte-exact");
    assert_eq!(reply, "seen 203.0.113.7:51000");

    let (server, task) = accept_one(ProxyProtocolLayer::new(["10.0.0.0/8".parse().unwrap()])).await;
    let mut client = tokio::net::TcpStream::connect(server).await.unwrap();
    client.write_all(&header).await.unwrap();
    client.write_all(b"data").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.unwrap();
    let seen = task.await.unwrap().unwrap();
    let me = client.local_addr().unwrap();
    assert_eq!((seen.client, seen.peer), (me, me), "not believed");
    assert_eq!(
        seen.data,
        [&header[..], b"data"].concat(),
        "passed on as data"
    );
    assert_eq!(reply, format!("seen {me}"));
}
