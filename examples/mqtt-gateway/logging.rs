//! Logs: plain or JSON lines on stderr, and client addresses masked on request.

use std::fmt;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Installs the global subscriber. The filter is `RUST_LOG` when set, else `log.level`;
/// rumqttd's own lines are off unless the filter names it (it logs every
/// readiness probe as an error), and so are the security events (target
/// `aegis::security`) when client addresses are masked.
pub(crate) fn init(log: &Log) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| log.level.clone());
    let mut directives = if directives.contains("rumqttd") {
        directives
    } else {
        format!("{directives},rumqttd=off")
    };
    if log.mask_client_addresses {
        // Security events name whole addresses (an audit trail needs them): with
        // masking on they stay out of the log, and are read at `/events` instead.
        directives.push_str(",aegis::security=off");
    }
    // `log.level` was validated; a bad RUST_LOG falls back to `info`.
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match log.format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A client address as the gateway logs it: whole, or masked to its network (`/24` of
/// IPv4, `/48` of IPv6, without the port) with `log.mask_client_addresses = true`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Client {
    pub(crate) addr: SocketAddr,
    pub(crate) masked: bool,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.masked {
            return write!(f, "{}", self.addr);
        }
        match self.addr.ip() {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                write!(f, "{a}.{b}.{c}.0/24")
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    let [a, b, c, _] = v4.octets();
                    write!(f, "{a}.{b}.{c}.0/24")
                }
                None => {
                    let s = v6.segments();
                    let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
                    write!(f, "{net}/48")
                }
            },
        }
    }
}
