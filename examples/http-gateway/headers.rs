//! Header rules of a proxy: hop-by-hop stripping, the forwarded headers, the `Host`
//! rules, and the header count and size limits. Plain functions over a `HeaderMap`.

use std::net::IpAddr;

use hyper::Version;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Authority;

/// The hop-by-hop headers of RFC 9110 §7.6.1 (plus the obsolete `Keep-Alive` and
/// `Proxy-Connection`): they describe one connection and must not be forwarded. Every
/// `Proxy-*` header and every header named in `Connection` go too.
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

/// Headers that carry a client address (or what a proxy saw of the client) to some
/// backend, framework or CDN, beside the `X-Forwarded-*` family (which covers
/// `X-Forwarded` itself): the standard `Forwarded`, nginx's `X-Real-IP`, Akamai's and
/// Cloudflare's `True-Client-IP`, Cloudflare's `CF-Connecting-IP` and
/// `CF-Pseudo-IPv4`, Fastly's `Fastly-Client-IP`, ingress-nginx's
/// `X-Original-Forwarded-For`, DigitalOcean's `DO-Connecting-IP`, Google App Engine's
/// `X-AppEngine-User-IP`, Envoy's `X-Envoy-External-Address`, Fly.io's
/// `Fly-Client-IP`, Azure Front Door's `X-Azure-ClientIP` and `X-Azure-SocketIP`, and
/// the older or unofficial `X-Client-IP`, `X-Cluster-Client-IP`, `Client-IP` (PHP's
/// `HTTP_CLIENT_IP`), `Forwarded-For`, `X-Originating-IP`, `X-Remote-IP` and
/// `X-Remote-Addr`, which client-address helpers of PHP and Node.js frameworks still
/// read.
pub const CLIENT_ADDRESS_HEADERS: [&str; 20] = [
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "cf-pseudo-ipv4",
    "fastly-client-ip",
    "x-original-forwarded-for",
    "do-connecting-ip",
    "x-appengine-user-ip",
    "x-envoy-external-address",
    "fly-client-ip",
    "x-azure-clientip",
    "x-azure-socketip",
    "x-client-ip",
    "x-cluster-client-ip",
    "client-ip",
    "forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
];

/// Headers that `Connection` cannot name away: `Host`, checked before the stripping and
/// copied to `X-Forwarded-Host` after it (without it, hyper's client would send the
/// backend's own address as `Host`), and the framing headers. `Transfer-Encoding` is
/// hop-by-hop all the same and goes with [`HOP_BY_HOP`] (hyper frames each hop itself).
pub const NOT_NAMEABLE: [HeaderName; 3] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers: those named in `Connection` (but the
/// [`NOT_NAMEABLE`] ones), the fixed list [`HOP_BY_HOP`] and every `Proxy-*` header
/// (`Proxy-Authorization` carries the client's credentials for *this* proxy, not for
/// the backend).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
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
    /// An HTTP/1.1 request without `Host`.
    Missing,
    /// More than one `Host` field (how many).
    Many(usize),
    /// A `Host` that is not a `host[:port]` (userinfo, bad characters, empty, a port
    /// that is not digits, brackets around no IPv6 address).
    Invalid,
}

/// Checks `Host` as RFC 9112 §3.2 asks a server to: exactly one in an HTTP/1.1 request
/// (an HTTP/1.0 one may have none), never more than one, and a valid `host[:port]`.
pub fn check_host(headers: &HeaderMap, version: Version) -> Result<(), BadHost> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return if version == Version::HTTP_11 {
            Err(BadHost::Missing)
        } else {
            Ok(())
        };
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
    /// Too many or too large headers ([`check_limits`]): `431`.
    TooLarge(TooLarge),
    /// A missing, repeated or invalid `Host` ([`check_host`]): `400`.
    BadHost(BadHost),
}

/// The request side of the header rules, in the gateway's order (`Sanitize` runs it on
/// every request): [`check_limits`] with `max_count` and `max_bytes`, then
/// [`check_host`], either of which refuses the request and leaves its headers as they
/// were; then [`strip_hop_by_hop`], [`remove_underscored`] and [`set_forwarded`] for
/// `client`.
pub fn sanitize_request(
    headers: &mut HeaderMap,
    version: Version,
    client: IpAddr,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), Refused> {
    check_limits(headers, max_count, max_bytes).map_err(Refused::TooLarge)?;
    check_host(headers, version).map_err(Refused::BadHost)?;
    strip_hop_by_hop(headers);
    remove_underscored(headers);
    set_forwarded(headers, client);
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let ok = |h: &HeaderMap, v| check_host(h, v);
        assert_eq!(ok(&map(&[("host", "gw.test")]), Version::HTTP_11), Ok(()));
        assert_eq!(
            ok(&map(&[("host", "[::1]:8080")]), Version::HTTP_11),
            Ok(())
        );
        assert_eq!(ok(&map(&[]), Version::HTTP_10), Ok(()), "1.0 needs none");
        assert_eq!(ok(&map(&[]), Version::HTTP_11), Err(BadHost::Missing));
        let two = map(&[("host", "a.test"), ("host", "b.test")]);
        assert_eq!(ok(&two, Version::HTTP_11), Err(BadHost::Many(2)));
        assert_eq!(ok(&two, Version::HTTP_10), Err(BadHost::Many(2)));
        for bad in ["user@gw.test", "", "gw.test/x", "gw test", ":80"] {
            let h = map(&[("host", bad)]);
            assert_eq!(ok(&h, Version::HTTP_11), Err(BadHost::Invalid), "{bad:?}");
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
            assert_eq!(
                check_host(&h, Version::HTTP_11),
                Err(BadHost::Invalid),
                "{bad:?}"
            );
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
            assert_eq!(check_host(&h, Version::HTTP_11), Ok(()), "{good:?}");
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
