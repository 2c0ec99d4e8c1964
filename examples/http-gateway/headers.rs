//! Header rules of a proxy: hop-by-hop stripping, the forwarded-for header, and the
//! header count and size limits. Plain functions over a `HeaderMap`.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

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

/// Removes the hop-by-hop headers: those named in `Connection`, the fixed list
/// [`HOP_BY_HOP`] and every `Proxy-*` header (`Proxy-Authorization` carries the
/// client's credentials for *this* proxy, not for the backend).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For` to the effective client address alone, replacing whatever
/// the client sent, and removes the other client-writable address headers
/// (`Forwarded`, `X-Real-IP`): a backend must never see an address the client chose.
pub fn set_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    headers.remove(header::FORWARDED);
    headers.remove("x-real-ip");
    let value = HeaderValue::from_str(&client.to_canonical().to_string())
        .expect("an IP address is a valid header value");
    headers.insert(X_FORWARDED_FOR, value);
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
    fn forwarded_for_is_replaced_never_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        set_forwarded_for(&mut h, "::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[X_FORWARDED_FOR], "192.0.2.7",
            "mapped IPv6 folded to IPv4"
        );
        assert!(h.get(header::FORWARDED).is_none());
        assert!(h.get("x-real-ip").is_none());
    }

    #[test]
    fn limits_count_every_field_and_their_bytes() {
        let h = map(&[("a", "1"), ("a", "2"), ("b", "3")]);
        assert_eq!(check_limits(&h, 3, 100), Ok(()));
        assert_eq!(check_limits(&h, 2, 100), Err(TooLarge::Count(3)));
        assert_eq!(check_limits(&h, 3, 17), Err(TooLarge::Bytes(18)));
    }
}
