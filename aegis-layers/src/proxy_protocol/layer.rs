use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use tower_layer::Layer;

use super::header::{V1_MAX_LEN, V2_MAX_LEN};
use super::{DEFAULT_MAX_HEADER_LEN, DEFAULT_TIMEOUT, ProxyProtocol};

/// Whether a trusted peer must send a PROXY header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderMode {
    /// A trusted peer without a header is rejected (`missing`). The default: a load
    /// balancer configured for the PROXY protocol always sends one.
    #[default]
    Required,
    /// A trusted peer may also connect without a header (its client address is then the
    /// peer), for example while a load balancer is being switched over. One that sends
    /// nothing before the deadline, or closes before its first byte, is passed on too;
    /// one that starts a PROXY signature or header must still complete it in time.
    ///
    /// **It lets clients choose their address** while any trusted peer forwards without
    /// a header of its own: the first bytes of such a connection are the client's, and a
    /// client that starts them with `PROXY TCP4 198.51.100.9 ...` is then believed, past
    /// per-client limits and bans, in another client's name. The specification says a
    /// receiver "must not try to guess whether the protocol header is present". Use it
    /// only for the time of a switch-over, with the trusted networks narrowed to the
    /// proxies that already send headers, or where the clients behind the trusted peers
    /// are trusted too.
    Optional,
}

/// What the layer and its services share; cloning it clones an `Arc`.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) trusted: Arc<[IpNet]>,
    pub(super) mode: HeaderMode,
    pub(super) timeout: Duration,
    pub(super) max_header_len: usize,
}

impl Config {
    /// Whether `ip` is in a trusted network, with IPv4-mapped IPv6 folded to IPv4 (a
    /// dual-stack listener reports IPv4 peers as `::ffff:a.b.c.d`).
    pub(super) fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// `net` as IPv4 when it is an IPv4-mapped IPv6 network (`::ffff:0:0/96` or narrower):
/// a peer is folded to IPv4 before it is matched, so in mapped form it would never
/// match. Any other network is returned as it is.
fn fold_mapped(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(prefix) = v6.prefix_len().checked_sub(96)
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        return IpNet::V4(Ipv4Net::new(v4, prefix).expect("a prefix of at most 32"));
    }
    net
}

/// Applies [`ProxyProtocol`] to a byte-stream service: reads PROXY v1/v2 headers from
/// trusted networks only. See the [module docs](super) for an example.
#[derive(Debug, Clone)]
#[must_use]
pub struct ProxyProtocolLayer {
    config: Config,
}

impl ProxyProtocolLayer {
    /// Trusts the proxies in `trusted` (only them: an empty list trusts no one), with a
    /// required header, a 3 s deadline and a 512-byte cap.
    ///
    /// Peers are matched after folding IPv4-mapped IPv6 addresses to IPv4, and so are
    /// the networks: one written in IPv4-mapped form, as a dual-stack socket shows its
    /// peers (`::ffff:10.0.0.5/128`, `::ffff:10.0.0.0/104`), is taken as the IPv4
    /// network it holds (`10.0.0.5/32`, `10.0.0.0/8`), which [`trusted`](Self::trusted)
    /// then lists. An IPv6 network wider than a `/96` is kept as it is: it matches IPv6
    /// peers only (`::/0` trusts no IPv4 peer).
    ///
    /// List your balancers' own addresses (`10.1.2.3/32`), not the network they share
    /// with clients: a trusted peer can name any client address, and every limit and ban
    /// keyed on the client's address then keys on what it names. A network of prefix
    /// length 0 (`0.0.0.0/0`, `::/0`) trusts every peer, so that any client can.
    pub fn new<T: IntoIterator<Item = IpNet>>(trusted: T) -> Self {
        let trusted: Arc<[IpNet]> = trusted
            .into_iter()
            .map(|net| fold_mapped(net.trunc()))
            .collect();
        Self {
            config: Config {
                trusted,
                mode: HeaderMode::Required,
                timeout: DEFAULT_TIMEOUT,
                max_header_len: DEFAULT_MAX_HEADER_LEN,
            },
        }
    }

    /// Whether trusted peers must send a header (default [`HeaderMode::Required`]).
    pub fn mode(mut self, mode: HeaderMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// How long a trusted peer has to deliver its complete header (default 3 s),
    /// counted from the first read that has to wait. In [`HeaderMode::Optional`] a
    /// trusted peer still silent then is passed on without a header.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// The longest v2 header accepted, fixed 16 bytes included (default 512). Raised to
    /// at least 107 (the v1 maximum) and capped at 65 551 (the v2 maximum). The read
    /// buffer never grows beyond it.
    pub fn max_header_len(mut self, len: usize) -> Self {
        self.config.max_header_len = len.clamp(V1_MAX_LEN, V2_MAX_LEN);
        self
    }

    /// The trusted networks.
    pub fn trusted(&self) -> &[IpNet] {
        &self.config.trusted
    }
}

impl<S> Layer<S> for ProxyProtocolLayer {
    type Service = ProxyProtocol<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProxyProtocol {
            inner,
            config: self.config.clone(),
        }
    }
}
