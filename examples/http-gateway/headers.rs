//! Header rules of a proxy: hop-by-hop stripping, the forwarded headers, the `Host`
//! rules, and the header count and size limits. Plain functions over a `HeaderMap`.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Authority;

/// The hop-by-hop headers of RFC 9110 §7.6.1 (plus the obsolete `Keep-Alive` and
/// `Proxy-Connection`): they describe one connection and must not be forwarded. Every
/// `Proxy-*` header and every header named in `Connection` go too. (`Expect` is not
/// hop-by-hop, but the proxy removes it from the request it sends on, having answered
/// `100-continue` itself: `crate::proxy`.)
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `X-Forwarded-For`, which the `http` crate has no constant for.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that carry a client address (or what a proxy saw of the client: its host,
/// the path it asked for) to some backend, framework or CDN, beside the `X-Forwarded-*` family (which covers
/// `X-Forwarded` itself): the standard `Forwarded`, nginx's `X-Real-IP`, Akamai's and
/// Cloudflare's `True-Client-IP`, Cloudflare's `CF-Connecting-IP`, `CF-Connecting-IPv6`
/// and `CF-Pseudo-IPv4`, Fastly's `Fastly-Client-IP`, ingress-nginx's
/// `X-Original-Forwarded-For`, DigitalOcean's `DO-Connecting-IP`, Google App Engine's
/// `X-AppEngine-User-IP`, Envoy's `X-Envoy-External-Address`, Fly.io's
/// `Fly-Client-IP`, Azure Front Door's `X-Azure-ClientIP` and `X-Azure-SocketIP`,
/// Oracle WebLogic's proxy plug-in's `WL-Proxy-Client-IP`, Google's `X-ProxyUser-Ip`,
/// Akamai's `Akamai-Client-IP`, and the older or unofficial `X-Client-IP`,
/// `X-Cluster-Client-IP`, `Client-IP` (PHP's `HTTP_CLIENT_IP`), `Forwarded-For`,
/// `X-Originating-IP`, `X-Remote-IP`, `X-Remote-Addr`, `Remote-Addr` (a CGI-style
/// backend's `HTTP_REMOTE_ADDR`, beside its own `REMOTE_ADDR`), `X-True-IP`,
/// `X-Real-Client-IP`, `X-Client-Addr` and `X-Custom-IP-Authorization` (which some
/// applications trust to let an address past an IP allow-list), which client-address
/// helpers of PHP, Java and Node.js frameworks still read; `X-Host` and
/// `X-Original-Host`, which some frameworks take for the request's host as they take
/// `X-Forwarded-Host` (a client's own would pick the host a backend puts in its links
/// and redirects); and `X-Original-URL` and `X-Rewrite-URL`, which IIS's URL rewriting
/// sets and some frameworks (Symfony and Zend Framework until their 2018 fixes,
/// CVE-2018-14773 and ZF2018-01) take for the request's path: a client's own routes the request to a path that access rules on
/// the request line (a WAF's, a front proxy's, the framework's own) never saw. The
/// gateway has no rules on paths itself, but nothing behind it should take a path from
/// the client's headers. `Proxy-Client-IP`, which the Java helpers read beside
/// `WL-Proxy-Client-IP`, goes with every `Proxy-*` header ([`strip_hop_by_hop`]). The
/// list is what the gateway knows of (a deny-list): a backend that reads a client
/// address, host or path from a header not on it gets the client's own value.
pub const CLIENT_ADDRESS_HEADERS: [&str; 33] = [
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "cf-pseudo-ipv4",
    "fastly-client-ip",
    "x-original-forwarded-for",
    "do-connecting-ip",
    "x-appengine-user-ip",
    "x-envoy-external-address",
    "fly-client-ip",
    "x-azure-clientip",
    "x-azure-socketip",
    "wl-proxy-client-ip",
    "x-proxyuser-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "client-ip",
    "forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "remote-addr",
    "x-true-ip",
    "x-real-client-ip",
    "x-client-addr",
    "akamai-client-ip",
    "x-custom-ip-authorization",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
];

/// Headers that `Connection` cannot name away: `Host`, checked before the stripping and
/// copied to `X-Forwarded-Host` after it (without it, hyper's client would send the
/// backend's own address as `Host`), and the framing headers. `Transfer-Encoding` is
/// hop-by-hop all the same and goes with [`HOP_BY_HOP`] (hyper frames each hop itself;
/// the proxy marks a request body of unknown length chunked again, since hyper's client
/// would send a `GET` without it bodiless).
pub const NOT_NAMEABLE: [HeaderName; 3] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers: those named in `Connection` (but the
/// [`NOT_NAMEABLE`] ones), the fixed list [`HOP_BY_HOP`] and every `Proxy-*` header
/// (`Proxy-Authorization` carries the client's credentials for *this* proxy, not for
/// the backend).
///
/// `Connection` is read as bytes: a value with other bytes than ASCII (obs-text, which
/// hyper lets through) still names the headers its other tokens name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .filter(|name| !NOT_NAMEABLE.contains(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    remove_prefixed(headers, "proxy-");
}

/// Removes every header whose (lower-case) name starts with `prefix`.
fn remove_prefixed(headers: &mut HeaderMap, prefix: &str) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(prefix))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Removes every header whose name has an underscore, as nginx does by default
/// (`underscores_in_headers off`).
///
/// Backends behind CGI, WSGI, Rack or PHP see headers as variables such as
/// `HTTP_X_FORWARDED_FOR`, with `-` turned into `_`: `X_Forwarded_For` and
/// `X-Forwarded-For` become the same variable, and so would `Client_IP`, `X_Real_IP`
/// and every other header the gateway removes or sets by name. Spelt with underscores,
/// a client's forged header would pass the gateway's removal and reach such a backend
/// in place of, or beside, the gateway's own. No standard header has an underscore.
pub fn remove_underscored(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Replaces whatever forwarding headers the client sent with the gateway's own: a
/// backend must never see an address (or scheme, host, port, prefix) the client chose.
///
/// Removes every header whose name starts with `x-forwarded` and the
/// [`CLIENT_ADDRESS_HEADERS`] (their spellings with underscores are
/// [`remove_underscored`]'s), then sets `X-Forwarded-For` to the effective client
/// address alone, `X-Forwarded-Proto` to `http` (the gateway serves plain HTTP; behind a
/// TLS terminator it still says `http`, since it cannot know better), and
/// `X-Forwarded-Host` to the request's `Host` when it has one (the `Host` itself is
/// forwarded too; this copy is for backends that read the forwarded one).
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    remove_prefixed(headers, "x-forwarded");
    for name in CLIENT_ADDRESS_HEADERS {
        headers.remove(name);
    }
    let value = HeaderValue::from_str(&client.to_canonical().to_string())
        .expect("an IP address is a valid header value");
    headers.insert(X_FORWARDED_FOR, value);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Why a request's `Host` is refused (answered `400`, RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    /// A request without `Host`, in any version ([`check_host`]).
    Missing,
    /// More than one `Host` field (how many).
    Many(usize),
    /// A `Host` that is not a `host[:port]` (userinfo, bad characters, empty, a port
    /// that is not digits, brackets around no IPv6 address).
    Invalid,
}

/// Checks `Host` as RFC 9112 §3.2 asks a server to: exactly one, never more, and a valid
/// `host[:port]`.
///
/// Exactly one in an HTTP/1.0 request too, which RFC 9112 lets leave it out: the gateway
/// has no name of its own to give the backend, and forwarded without one, the request
/// reached the backend with the `Host` hyper's client fills in, the backend's own
/// address, which a backend puts in the redirects it builds. Envoy likewise refuses an
/// HTTP/1.0 request without `Host` unless configured with a default one
/// (`default_host_for_http_10`).
pub fn check_host(headers: &HeaderMap) -> Result<(), BadHost> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Err(BadHost::Missing);
    };
    let more = hosts.count();
    if more > 0 {
        return Err(BadHost::Many(1 + more));
    }
    match Authority::try_from(host.as_bytes()) {
        Ok(a) if !a.as_str().contains('@') && is_host_port(&a) => Ok(()),
        _ => Err(BadHost::Invalid),
    }
}

/// Whether `authority` (without userinfo) is `uri-host [":" port]` (RFC 9112 §3.2,
/// RFC 3986 §3.2.2): a host, an IPv6 address in brackets or a name or IPv4 address
/// without any, then nothing or `:` and digits. `Authority` alone lets through what
/// only looks like one: `gw.test:abc`, `gw.test[x]`, `[zz]`, `[::1]x`. An IPv6 zone
/// identifier and the IPvFuture form are refused too: no client sends them in `Host`.
fn is_host_port(authority: &Authority) -> bool {
    let host = authority.host();
    let Some(port) = authority.as_str().strip_prefix(host) else {
        return false;
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = match host.strip_prefix('[') {
        Some(literal) => literal
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && !host.contains(['[', ']']),
    };
    port_ok && host_ok
}

/// A `Transfer-Encoding` other than one `chunked` (RFC 9112 §6.1): a transfer coding
/// the gateway does not implement.
///
/// hyper reads a message whose last coding is `chunked` (`gzip, chunked`,
/// `chunked, chunked`, or `gzip` and `chunked` fields) and undoes the chunked framing
/// alone; the stripped `Transfer-Encoding` then took the other codings with it, and the
/// peer got still-encoded bytes as an identity body, with nothing saying so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownCoding;

impl std::fmt::Display for UnknownCoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a transfer coding other than one `chunked`")
    }
}

impl std::error::Error for UnknownCoding {}

/// Checks that `Transfer-Encoding`, if present, is exactly one `chunked` (one field,
/// one token, any case): a request otherwise is answered `501`, a backend's response
/// `502`.
pub fn check_transfer_coding(headers: &HeaderMap) -> Result<(), UnknownCoding> {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(UnknownCoding),
    }
}

/// Why a request's headers are refused (answered `431`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLarge {
    /// More header fields than allowed.
    Count(usize),
    /// More bytes of names and values than allowed.
    Bytes(usize),
}

/// Checks the header count (every field, repeated names included) and their size (the
/// bytes of names and values, plus 4 per field for `": "` and CRLF).
pub fn check_limits(
    headers: &HeaderMap,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), TooLarge> {
    if headers.len() > max_count {
        return Err(TooLarge::Count(headers.len()));
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > max_bytes {
        return Err(TooLarge::Bytes(bytes));
    }
    Ok(())
}

/// Why a request is refused before it goes on: the gateway answers it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A transfer coding other than one `chunked` ([`check_transfer_coding`]): `501`.
    UnknownCoding(UnknownCoding),
    /// Too many or too large headers ([`check_limits`]): `431`.
    TooLarge(TooLarge),
    /// A missing, repeated or invalid `Host` ([`check_host`]): `400`.
    BadHost(BadHost),
}

/// The request side of the header rules, in the gateway's order (`Sanitize` runs it on
/// every request): [`check_transfer_coding`] (before the stripping takes
/// `Transfer-Encoding` away), [`check_limits`] with `max_count` and `max_bytes`, then
/// [`check_host`], any of which refuses the request and leaves its headers as they
/// were; then [`strip_hop_by_hop`], [`remove_underscored`] and [`set_forwarded`] for
/// `client`.
pub fn sanitize_request(
    headers: &mut HeaderMap,
    client: IpAddr,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), Refused> {
    check_transfer_coding(headers).map_err(Refused::UnknownCoding)?;
    check_limits(headers, max_count, max_bytes).map_err(Refused::TooLarge)?;
    check_host(headers).map_err(Refused::BadHost)?;
    strip_hop_by_hop(headers);
    remove_underscored(headers);
    set_forwarded(headers, client);
    Ok(())
}

/// The `http_headers` fuzz target's logic (`fuzz/`, which includes this file), also run
/// by the tests over its seeds and over random header maps.
///
/// An input is three bytes, the client address, then header lines:
///
/// - the request's version, `[1.0, 1.1, 2, 0.9][byte % 4]` (`b'0'` is 1.0, `b'1'` 1.1),
///   which no rule depends on any more (a request without `Host` is refused in every
///   version), kept so that the corpus reads as before;
/// - the client address's kind, `byte % 4`: 0 and 3 IPv4 (4 bytes follow), 1 IPv4-mapped
///   IPv6 (4 bytes follow), 2 IPv6 (16 bytes follow); missing bytes are zeros;
/// - the header limits: under `0x80` the gateway's ([`GATEWAY_LIMITS`]), else
///   `byte & 0x0f` fields and `((byte >> 4) & 7) * 128` bytes;
/// - lines split at `\n` (a `\r` before it dropped), each `name:value`, the value's
///   leading and trailing spaces and tabs trimmed, as hyper's parser does; a line
///   without `:`, a name `HeaderName` refuses or a value `HeaderValue` refuses is left
///   out, and names may repeat. At most [`MAX_FIELDS`] fields.
///
/// [`run`] gives the map to [`check_limits`] and [`check_host`] and compares them with
/// references of their own, to [`strip_hop_by_hop`] as a backend's response (the proxy
/// strips every answer so), and to [`sanitize_request`] as a request, and asserts what
/// the gateway promises of the result (see [`run`]).
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hyper::Version;

    use super::*;

    /// The gateway's header limits (`gateway::Config::new`): 64 fields, 8 KiB.
    pub const GATEWAY_LIMITS: (usize, usize) = (64, 8 * 1024);
    /// The most fields an input gives (hyper's parser stops the gateway's at 128).
    pub const MAX_FIELDS: usize = 256;
    /// The request versions, by the first byte.
    const VERSIONS: [Version; 4] = [
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
        Version::HTTP_09,
    ];

    /// A decoded input.
    #[derive(Debug, Clone)]
    pub struct Input {
        /// The request's version.
        pub version: Version,
        /// The connection's client address.
        pub client: IpAddr,
        /// The most fields, and the most bytes of them, [`check_limits`] allows.
        pub limits: (usize, usize),
        /// The fields, in order.
        pub fields: Vec<(HeaderName, HeaderValue)>,
    }

    /// Decodes an input (see the [module docs](self)); total.
    pub fn decode(data: &[u8]) -> Input {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let version = VERSIONS[usize::from(byte(0) % 4)];
        let kind = byte(1) % 4;
        let len = if kind == 2 { 16 } else { 4 };
        let mut addr = [0u8; 16];
        for (i, b) in addr[..len].iter_mut().enumerate() {
            *b = byte(3 + i);
        }
        let v4 = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
        let client = match kind {
            1 => IpAddr::V6(v4.to_ipv6_mapped()),
            2 => IpAddr::V6(Ipv6Addr::from(addr)),
            _ => IpAddr::V4(v4),
        };
        let limits = match byte(2) {
            b if b < 0x80 => GATEWAY_LIMITS,
            b => (usize::from(b & 0x0f), usize::from((b >> 4) & 7) * 128),
        };
        let lines = data.get(3 + len..).unwrap_or_default();
        let fields = lines
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                let name = HeaderName::from_bytes(&line[..colon]).ok()?;
                let value = HeaderValue::from_bytes(trim_ows(&line[colon + 1..])).ok()?;
                Some((name, value))
            })
            .take(MAX_FIELDS)
            .collect();
        Input {
            version,
            client,
            limits,
            fields,
        }
    }

    /// `bytes` without its leading and trailing spaces and tabs (RFC 9110 §5.6.3 OWS).
    fn trim_ows(mut bytes: &[u8]) -> &[u8] {
        while let [b' ' | b'\t', rest @ ..] = bytes {
            bytes = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = bytes {
            bytes = rest;
        }
        bytes
    }

    /// Runs one input and panics if a promise breaks; returns what the gateway did with
    /// the request (`Ok`: forwarded).
    ///
    /// Checked: [`check_limits`] and [`check_host`] give what references of their own
    /// give (for `Host` as far as a simple `host[:port]` reading decides); a refused
    /// request's headers are left as they were; after [`strip_hop_by_hop`] on the
    /// fields as a response, and after [`sanitize_request`] on them as a request, no
    /// hop-by-hop header is left, no `Proxy-*` header and no header named in a
    /// `Connection` token but `Host` and `Content-Length`, which are kept as they were,
    /// and every other field is kept as it was; of the request besides, no header with
    /// an `_`, no [`CLIENT_ADDRESS_HEADERS`] and no `X-Forwarded-*` but the gateway's
    /// three: `X-Forwarded-For` the client's address alone (an IPv4-mapped one as
    /// IPv4), `X-Forwarded-Proto: http`, and `X-Forwarded-Host` a copy of `Host` when
    /// there is one.
    pub fn run(data: &[u8]) -> Result<(), Refused> {
        let input = decode(data);
        let mut headers = HeaderMap::new();
        for (name, value) in &input.fields {
            headers.append(name.clone(), value.clone());
        }
        let coding = check_transfer_coding(&headers);
        let (max_count, max_bytes) = input.limits;
        let limits = check_limits(&headers, max_count, max_bytes);
        assert_eq!(limits, limits_reference(&input), "check_limits");
        let host = check_host(&headers);
        host_agrees(&input, host);

        let mut response = headers.clone();
        strip_hop_by_hop(&mut response);
        check_stripped(&headers, &response, false);

        let before = headers.clone();
        let result = sanitize_request(&mut headers, input.client, max_count, max_bytes);
        match result {
            Err(Refused::UnknownCoding(e)) => assert_eq!(coding, Err(e)),
            Err(Refused::TooLarge(e)) => assert_eq!((coding, limits), (Ok(()), Err(e))),
            Err(Refused::BadHost(e)) => {
                assert_eq!((coding, limits, host), (Ok(()), Ok(()), Err(e)));
            }
            Ok(()) => assert_eq!((coding, limits, host), (Ok(()), Ok(()), Ok(()))),
        }
        if result.is_err() {
            assert_eq!(
                headers, before,
                "a refused request's headers are left alone"
            );
        } else {
            check_stripped(&before, &headers, true);
            check_forwarded(&before, &headers, input.client);
        }
        result
    }

    /// What [`check_limits`] should say, from the decoded fields.
    fn limits_reference(input: &Input) -> Result<(), TooLarge> {
        let (max_count, max_bytes) = input.limits;
        let count = input.fields.len();
        let bytes: usize = input
            .fields
            .iter()
            .map(|(name, value)| name.as_str().len() + value.as_bytes().len() + 4)
            .sum();
        if count > max_count {
            Err(TooLarge::Count(count))
        } else if bytes > max_bytes {
            Err(TooLarge::Bytes(bytes))
        } else {
            Ok(())
        }
    }

    /// Asserts that [`check_host`]'s answer `got` is what RFC 9112 §3.2 asks of the
    /// `Host` fields, as far as [`host_reference`] decides a value.
    fn host_agrees(input: &Input, got: Result<(), BadHost>) {
        let hosts: Vec<&HeaderValue> = input
            .fields
            .iter()
            .filter(|(name, _)| name == header::HOST)
            .map(|(_, value)| value)
            .collect();
        match hosts[..] {
            [] => assert_eq!(got, Err(BadHost::Missing), "{:?}", input.version),
            [host] => match host_reference(host.as_bytes()) {
                Some(true) => assert_eq!(got, Ok(()), "Host {host:?}"),
                Some(false) => assert_eq!(got, Err(BadHost::Invalid), "Host {host:?}"),
                None => assert!(matches!(got, Ok(()) | Err(BadHost::Invalid)), "{got:?}"),
            },
            _ => assert_eq!(got, Err(BadHost::Many(hosts.len()))),
        }
    }

    /// Whether `value` is a valid `Host` (`uri-host [":" port]`, RFC 9112 §3.2, RFC 3986
    /// §3.2.2), empty host excepted (the gateway refuses it); `None` where it does not
    /// judge: percent-encoded names, IPvFuture and zone identifiers.
    pub fn host_reference(value: &[u8]) -> Option<bool> {
        let port_ok = |port: &[u8]| port.iter().all(u8::is_ascii_digit);
        if let Some(rest) = value.strip_prefix(b"[") {
            let Some(end) = rest.iter().position(|&b| b == b']') else {
                return Some(false);
            };
            let (literal, after) = (&rest[..end], &rest[end + 1..]);
            if !(after.is_empty() || after.strip_prefix(b":").is_some_and(port_ok)) {
                return Some(false);
            }
            if literal
                .first()
                .is_some_and(|b| b.eq_ignore_ascii_case(&b'v'))
                || literal.contains(&b'%')
            {
                return None;
            }
            let ipv6 = std::str::from_utf8(literal)
                .ok()
                .and_then(|s| s.parse::<Ipv6Addr>().ok());
            return Some(ipv6.is_some());
        }
        let (host, port) = match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], &value[i + 1..]),
            None => (value, &b""[..]),
        };
        if host.is_empty() || !port_ok(port) {
            return Some(false);
        }
        if host.contains(&b'%') {
            return None;
        }
        // reg-name: unreserved and sub-delims (an IPv4 address is one too).
        Some(
            host.iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)),
        )
    }

    /// The headers the gateway sets on each request itself.
    const OURS: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

    /// The `Connection` tokens of `headers`, lower-case: each value split at `,`, spaces
    /// and tabs trimmed, empty ones left out (RFC 9110 §7.6.1, §5.6.1).
    fn connection_tokens(headers: &HeaderMap) -> Vec<Vec<u8>> {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|t| trim_ows(t).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether the rules remove `name` from a message with `before`'s fields (`request`:
    /// [`sanitize_request`]'s, else [`strip_hop_by_hop`]'s).
    fn removed(name: &str, tokens: &[Vec<u8>], request: bool) -> bool {
        let named = tokens.iter().any(|t| t == name.as_bytes());
        HOP_BY_HOP.contains(&name)
            || name.starts_with("proxy-")
            || (named && name != "host" && name != "content-length")
            || (request
                && (name.contains('_')
                    || name.starts_with("x-forwarded")
                    || CLIENT_ADDRESS_HEADERS.contains(&name)))
    }

    /// The promises of [`strip_hop_by_hop`] (and, with `request`, of the rest of
    /// [`sanitize_request`] but the forwarded headers' values).
    fn check_stripped(before: &HeaderMap, after: &HeaderMap, request: bool) {
        let tokens = connection_tokens(before);
        for name in after.keys() {
            let name = name.as_str();
            if request && OURS.contains(&name) {
                continue;
            }
            assert!(before.contains_key(name), "{name} added");
            assert!(!removed(name, &tokens, request), "{name} kept");
        }
        for name in before.keys() {
            if !removed(name.as_str(), &tokens, request) {
                let was: Vec<_> = before.get_all(name).iter().collect();
                let is: Vec<_> = after.get_all(name).iter().collect();
                assert_eq!(was, is, "{name} changed");
            }
        }
        for name in [header::HOST, header::CONTENT_LENGTH] {
            let was: Vec<_> = before.get_all(&name).iter().collect();
            let is: Vec<_> = after.get_all(&name).iter().collect();
            assert_eq!(
                was, is,
                "{name} is not hop-by-hop, whatever Connection says"
            );
        }
    }

    /// The forwarded headers of a sanitized request.
    fn check_forwarded(before: &HeaderMap, after: &HeaderMap, client: IpAddr) {
        let all = |name| after.get_all(name).iter().collect::<Vec<_>>();
        let xff = all(X_FORWARDED_FOR);
        assert_eq!(xff.len(), 1, "one X-Forwarded-For: {xff:?}");
        let addr: IpAddr = xff[0].to_str().unwrap().parse().unwrap();
        assert_eq!(addr, client.to_canonical(), "X-Forwarded-For is the client");
        assert_eq!(xff[0], addr.to_string().as_str(), "and only the client");
        if let IpAddr::V6(v6) = client
            && v6.to_ipv4_mapped().is_some()
        {
            assert!(addr.is_ipv4(), "a mapped address is forwarded as IPv4");
        }
        assert_eq!(all(X_FORWARDED_PROTO), ["http"]);
        let host: Vec<_> = before.get_all(header::HOST).iter().collect();
        assert_eq!(all(X_FORWARDED_HOST), host, "X-Forwarded-Host is Host");
    }

    /// An input for `fields` (lines `name: value`) from `client`, with the gateway's
    /// limits or `limits` (a limits byte, see the module docs): the seeds' and the
    /// tests' encoder, the inverse of [`decode`].
    #[cfg(test)]
    pub fn encode(version: Version, client: IpAddr, limits: Option<u8>, fields: &str) -> Vec<u8> {
        let v = VERSIONS.iter().position(|&v| v == version).unwrap();
        let mut out = vec![b'0' + u8::try_from(v).unwrap()];
        match client {
            IpAddr::V4(a) => {
                out.extend([b'4', limits.unwrap_or(b'-')].into_iter().chain(a.octets()))
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => out.extend(
                    [b'5', limits.unwrap_or(b'-')]
                        .into_iter()
                        .chain(v4.octets()),
                ),
                None => out.extend([b'6', limits.unwrap_or(b'-')].into_iter().chain(a.octets())),
            },
        }
        out.extend_from_slice(fields.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use hyper::Version;
    use proptest::strategy::Strategy as _;

    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("accept", "*/*"),
            ("host", "example.com"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept", "host"]);
    }

    /// Found by the `http_headers` fuzz target: a `Connection` value with a byte over
    /// 0x7F was skipped whole (`to_str` fails on it), so the headers its other tokens
    /// name went on, the backend's to the client as well as the client's to the backend.
    #[test]
    fn connection_with_a_non_ascii_byte_still_names_its_tokens() {
        let mut h = map(&[("x-a", "1"), ("x-b", "2"), ("accept", "*/*")]);
        let value = HeaderValue::from_bytes(b"x-a, caf\xe9, X-B").unwrap();
        h.append(header::CONNECTION, value);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn only_one_chunked_is_a_known_transfer_coding() {
        for ok in [&[][..], &["chunked"], &["Chunked"], &["CHUNKED"]] {
            let h = map(&ok
                .iter()
                .map(|v| ("transfer-encoding", *v))
                .collect::<Vec<_>>());
            assert_eq!(check_transfer_coding(&h), Ok(()), "{ok:?}");
        }
        for bad in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
            &["gzip"],
            &["identity"],
            &["chunked;x=1"],
            &[""],
        ] {
            let h = map(&bad
                .iter()
                .map(|v| ("transfer-encoding", *v))
                .collect::<Vec<_>>());
            assert_eq!(check_transfer_coding(&h), Err(UnknownCoding), "{bad:?}");
        }
    }

    #[test]
    fn connection_cannot_name_away_host_or_content_length() {
        let mut h = map(&[
            (
                "connection",
                "host, Content-Length, transfer-encoding, x-gone",
            ),
            ("host", "gw.test"),
            ("content-length", "3"),
            ("x-gone", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host"]);
        assert_eq!(h["host"], "gw.test");
    }

    #[test]
    fn forwarded_headers_are_replaced_never_appended() {
        let mut h = map(&[
            ("host", "gw.test"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.test"),
            ("x-forwarded-port", "443"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("wl-proxy-client-ip", "6.6.6.6"),
            ("x-proxyuser-ip", "6.6.6.6"),
        ]);
        set_forwarded(&mut h, "::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[X_FORWARDED_FOR], "192.0.2.7",
            "mapped IPv6 folded to IPv4"
        );
        assert_eq!(h.get_all(X_FORWARDED_PROTO).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h.get_all(X_FORWARDED_HOST).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_HOST], "gw.test");
        for name in [
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
            "cf-connecting-ip",
            "wl-proxy-client-ip",
            "x-proxyuser-ip",
        ] {
            assert!(h.get(name).is_none(), "{name}");
        }

        let mut h = map(&[("x-forwarded-host", "evil.test")]);
        set_forwarded(&mut h, "192.0.2.7".parse().unwrap());
        assert!(
            h.get(X_FORWARDED_HOST).is_none(),
            "no Host, no forwarded one"
        );
    }

    #[test]
    fn headers_with_an_underscore_are_removed() {
        let mut h = map(&[
            ("x_forwarded_for", "6.6.6.6"),
            ("client_ip", "6.6.6.6"),
            ("x-custom_thing", "1"),
            ("x-kept", "1"),
            ("host", "gw.test"),
        ]);
        remove_underscored(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"]);
    }

    #[test]
    fn host_must_be_one_valid_authority_and_is_required_from_http_1_1() {
        let ok = |h: &HeaderMap| check_host(h);
        assert_eq!(ok(&map(&[("host", "gw.test")])), Ok(()));
        assert_eq!(ok(&map(&[("host", "[::1]:8080")])), Ok(()));
        assert_eq!(ok(&map(&[])), Err(BadHost::Missing));
        let two = map(&[("host", "a.test"), ("host", "b.test")]);
        assert_eq!(ok(&two), Err(BadHost::Many(2)));
        for bad in ["user@gw.test", "", "gw.test/x", "gw test", ":80"] {
            let h = map(&[("host", bad)]);
            assert_eq!(ok(&h), Err(BadHost::Invalid), "{bad:?}");
        }
    }

    /// `Authority` takes these, and the gateway used to forward them as the request's
    /// `Host` (and its `X-Forwarded-Host`): none is `host[:port]`.
    #[test]
    fn host_with_a_bad_port_or_brackets_out_of_place_is_invalid() {
        for bad in [
            "gw.test:abc",
            "gw.test:8080x",
            "[::1]:x",
            "[::1]x",
            "gw.test[x]",
            "x[::1]",
            "[zz]",
            "[]",
            "[v1.x]",
            "[fe80::1%25eth0]",
        ] {
            let h = map(&[("host", bad)]);
            assert_eq!(check_host(&h), Err(BadHost::Invalid), "{bad:?}");
        }
        for good in [
            "gw.test:",
            "gw.test:8080",
            "192.0.2.7:80",
            "[::ffff:192.0.2.7]:443",
            "[2001:db8::7]",
            "GW.Test",
            "a-b_c~d!$&'()*+,;=",
        ] {
            let h = map(&[("host", good)]);
            assert_eq!(check_host(&h), Ok(()), "{good:?}");
        }
    }

    /// The seeds of the `http_headers` fuzz target: `ok_*` go through the gateway's
    /// rules, `bad_*` are refused.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        use fuzz::encode;
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let v11 = Version::HTTP_11;
        vec![
            ("ok_minimal", encode(v11, v4, None, "Host: gw.test\n")),
            (
                "bad_no_host_http10",
                encode(Version::HTTP_10, v4, None, "Accept: */*\n"),
            ),
            (
                "ok_hop_by_hop",
                encode(
                    v11,
                    v4,
                    None,
                    "Host: gw.test\nConnection: keep-alive, X-Secret, upgrade\n\
                     Connection: x-other\nKeep-Alive: timeout=5\nTE: trailers\n\
                     Trailer: x-sum\nTransfer-Encoding: chunked\nUpgrade: websocket\n\
                     Proxy-Authorization: Basic Zm9vOmJhcg==\nProxy-Connection: keep-alive\n\
                     X-Secret: 1\nx-other: 2\nAccept: */*\n",
                ),
            ),
            (
                "ok_connection_names_framing",
                encode(
                    v11,
                    v4,
                    None,
                    "Connection: host, Content-Length, transfer-encoding, x-forwarded-for\n\
                     Host: gw.test\nContent-Length: 3\nX-Forwarded-For: 6.6.6.6\n",
                ),
            ),
            (
                "ok_forged_forwarding",
                encode(
                    v11,
                    mapped,
                    None,
                    "Host: gw.test\nX-Forwarded-For: 6.6.6.6\nX-Forwarded-For: 7.7.7.7\n\
                     X-Forwarded-Proto: https\nX-Forwarded-Host: evil.test\n\
                     X-Forwarded-Port: 443\nForwarded: for=6.6.6.6\nX-Real-IP: 6.6.6.6\n\
                     CF-Connecting-IP: 6.6.6.6\nTrue-Client-IP: 6.6.6.6\n\
                     X_Forwarded_For: 6.6.6.6\nClient_IP: 6.6.6.6\n",
                ),
            ),
            (
                "ok_ipv6_client_and_host",
                encode(v11, v6, None, "Host: [::1]:8080\nAccept: text/html\n"),
            ),
            (
                "ok_crlf_ows_and_obs_text",
                encode(
                    v11,
                    v4,
                    None,
                    "Host:  gw.test \r\nX-A:\tv\t\r\nX-Name: caf\u{e9}\r\n",
                ),
            ),
            (
                "ok_connection_with_obs_text",
                encode(
                    v11,
                    v4,
                    None,
                    "Host: gw.test\nConnection: x-a, caf\u{e9}\nX-A: 1\n",
                ),
            ),
            ("bad_no_host_http11", encode(v11, v4, None, "Accept: */*\n")),
            (
                "bad_two_hosts",
                encode(v11, v4, None, "Host: a.test\nHost: b.test\n"),
            ),
            (
                "bad_two_hosts_http10",
                encode(Version::HTTP_10, v4, None, "Host: a.test\nhost: b.test\n"),
            ),
            (
                "bad_host_userinfo",
                encode(v11, v4, None, "Host: user@gw.test\n"),
            ),
            ("bad_host_path", encode(v11, v4, None, "Host: gw.test/x\n")),
            (
                "bad_host_port_not_digits",
                encode(v11, v4, None, "Host: gw.test:abc\n"),
            ),
            // 2 fields at most (0xf2: 2 fields, 7 * 128 bytes).
            (
                "bad_too_many_fields",
                encode(v11, v4, Some(0xf2), "Host: gw.test\nA: 1\nB: 2\n"),
            ),
            // 128 bytes at most (0x9f: 15 fields, 128 bytes).
            (
                "bad_too_many_bytes",
                encode(
                    v11,
                    v4,
                    Some(0x9f),
                    &format!("Host: gw.test\nX-Big: {}\n", "a".repeat(120)),
                ),
            ),
        ]
    }

    /// The fuzz logic's default limits are the gateway's.
    #[test]
    fn fuzz_limits_are_the_gateways() {
        let limits = crate::gateway::Config::new(Vec::new()).limits;
        let gateway = (limits.max_headers, limits.max_header_bytes);
        assert_eq!(fuzz::GATEWAY_LIMITS, gateway);
    }

    fn corpus_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_headers")
    }

    /// Writes the seeds: `cargo test -p examples --features test-util --test http_gateway
    /// write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/corpus/http_headers"]
    fn write_seeds() {
        aegis_core::testing::write_seeds(&corpus_dir(), &seeds());
    }

    /// The committed seeds are the generator's.
    #[test]
    fn committed_seeds_are_the_generators() {
        aegis_core::testing::assert_seeds_committed(&corpus_dir(), &seeds());
    }

    /// The seeds through the fuzz logic: `bad_*` refused, `ok_*` forwarded. Files not
    /// named so (what `cargo fuzz run` adds to a corpus) are not judged.
    #[test]
    fn fuzz_seeds_replay() {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("ok_") || name.starts_with("bad_")) {
                continue;
            }
            let result = fuzz::run(&std::fs::read(&path).unwrap());
            assert_eq!(
                result.is_ok(),
                name.starts_with("ok_"),
                "{name}: {result:?}"
            );
            n += 1;
        }
        assert!(n >= seeds().len(), "{n} seeds");
    }

    /// Field names the rules care about, in several spellings.
    static NAMES: [&str; 24] = [
        "Host",
        "host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-X",
        "X-Forwarded-For",
        "x-forwarded-proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X-Forwarded",
        "Forwarded",
        "X-Real-IP",
        "CF-Connecting-IP",
        "X_Forwarded_For",
        "x-a",
        "X-B",
        "x_c",
    ];

    /// Values, `Connection` lists and hosts among them.
    static VALUES: [&str; 17] = [
        "X-B, caf\u{e9}",
        "gw.test",
        "gw.test:8080",
        "[::1]:80",
        "user@gw.test",
        "gw.test:abc",
        "",
        "keep-alive, x-a",
        "X-B , x_c,,",
        "host, content-length, transfer-encoding",
        "x-forwarded-for, X-Forwarded-Host",
        "proxy-x, upgrade",
        "close",
        "6.6.6.6",
        "3",
        "chunked",
        "\tx-a\t, X-Real-IP",
    ];

    proptest::proptest! {
        /// Random header maps keep the fuzz target's promises.
        #[test]
        fn random_header_maps_keep_the_promises(
            version in proptest::sample::select(vec![
                Version::HTTP_10,
                Version::HTTP_11,
                Version::HTTP_2,
                Version::HTTP_09,
            ]),
            client in proptest::prelude::any::<std::net::IpAddr>(),
            limits in proptest::option::of(proptest::prelude::any::<u8>()),
            fields in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::sample::select(&NAMES[..]).prop_map(str::to_owned),
                        "[A-Za-z0-9_-]{1,10}",
                    ],
                    proptest::prop_oneof![
                        proptest::sample::select(&VALUES[..]).prop_map(str::to_owned),
                        "[ -~]{0,16}",
                    ],
                ),
                0..24,
            ),
        ) {
            let lines: String = fields.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
            let _ = fuzz::run(&fuzz::encode(version, client, limits, &lines));
        }
    }

    #[test]
    fn limits_count_every_field_and_their_bytes() {
        let h = map(&[("a", "1"), ("a", "2"), ("b", "3")]);
        assert_eq!(check_limits(&h, 3, 100), Ok(()));
        assert_eq!(check_limits(&h, 2, 100), Err(TooLarge::Count(3)));
        assert_eq!(check_limits(&h, 3, 17), Err(TooLarge::Bytes(18)));
    }
}
