//! Logs: plain or JSON lines on stderr, and client addresses masked on request. Lines
//! are written by a thread of their own through a bounded queue (`log_writer::Lossy`):
//! a stderr that nobody reads (a stalled log pipe) loses lines, counted, but never
//! blocks the runtimes or the signal handling.

use std::fmt;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use aegis_core::{ClientKey, KeyBy};
use aegis_mqtt::security::BanKey;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{DynFilterFn, filter_fn};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{Log, LogFormat};
use crate::log_writer::Lossy;

/// The log writer [`init`] installed, for [`flush`] and [`finish`].
static WRITER: OnceLock<Lossy> = OnceLock::new();

/// `RUST_LOG`, when set (and not blank): the filter [`init`] uses instead of `log.level`.
pub(crate) fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Installs the global subscriber. The filter is `RUST_LOG` when set, else `log.level`.
/// Unless the filter names `rumqttd`, the embedded broker logs errors only, and none of
/// one connection's ([`in_broker_link`]): it logs every readiness probe, a connection
/// closed before its CONNECT, as an error, but its listener's failure must be seen.
/// When client addresses are masked, the security events (target `aegis::security`) are
/// off, and so are the debug and trace lines and spans of `aegis_core` and
/// `aegis_mqtt` ([`names_clients`]), whatever the filter says.
pub(crate) fn init(log: &Log) {
    let filter = rust_log().unwrap_or_else(|| log.level.clone());
    let fixed = |directives: &str| {
        let mut directives = directives.to_owned();
        if !directives.contains("rumqttd") {
            directives.push_str(",rumqttd=error");
        }
        if log.mask_client_addresses {
            // Security events name whole addresses (an audit trail needs them): with
            // masking on they stay out of the log, and are read at `/events` instead.
            directives.push_str(",aegis::security=off");
        }
        directives
    };
    // `log.level` was validated; a bad RUST_LOG falls back to `info` (with the same
    // fixed directives).
    let (filter, names_rumqttd) = match EnvFilter::try_new(fixed(&filter)) {
        Ok(env) => (env, filter.contains("rumqttd")),
        Err(_) => (EnvFilter::new(fixed("info")), false),
    };
    let quiet = !names_rumqttd;
    let masked = log
        .mask_client_addresses
        .then(|| filter_fn(|meta| !names_clients(meta)));
    let writer = Lossy::start(std::io::stderr(), "mqtt-gateway");
    let _ = WRITER.set(writer.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match log.format {
        LogFormat::Plain => {
            let links = quiet.then(without_broker_links);
            builder.finish().with(links).with(masked).init();
        }
        LogFormat::Json => {
            let links = quiet.then(without_broker_links);
            let json = builder.json().flatten_event(true).finish();
            json.with(links).with(masked).init();
        }
    }
}

/// Waits up to `within` for the lines logged so far to reach stderr (not at all before
/// [`init`]); whether they did.
pub(crate) fn flush(within: Duration) -> bool {
    WRITER.get().is_none_or(|w| w.flush(within))
}

/// At the end of the process: logs how many lines were dropped, if any, and waits (a
/// second at most) for the queued lines to reach stderr ([`Lossy::finish`]).
pub(crate) fn finish() {
    if let Some(w) = WRITER.get() {
        w.finish("stderr");
    }
}

/// Whether `meta` is a line or span that names whole client addresses, which masking
/// keeps out: the libraries' debug and trace ones. `aegis_core`'s accept loop opens a
/// debug span `conn` with the peer's `ip:port` around every connection (so every line
/// logged inside it carries the address) and logs `%peer` at debug; `aegis_mqtt` logs
/// `client_addr` at debug and trace. The gateway's own lines mask it themselves
/// ([`Client`]).
fn names_clients(meta: &Metadata<'_>) -> bool {
    *meta.level() > Level::INFO
        && (in_crate(meta.target(), "aegis_core") || in_crate(meta.target(), "aegis_mqtt"))
}

/// A filter that drops the events of [`in_broker_link`], looking at the span context
/// of rumqttd's events only.
fn without_broker_links<S>() -> DynFilterFn<
    S,
    impl Fn(&Metadata<'_>, &Context<'_, S>) -> bool,
    impl Fn(&'static Metadata<'static>) -> Interest,
>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    DynFilterFn::new(|meta: &Metadata<'_>, cx: &Context<'_, S>| !in_broker_link(meta, cx))
        .with_callsite_filter(|meta| {
            if meta.is_event() && in_crate(meta.target(), "rumqttd") {
                Interest::sometimes()
            } else {
                Interest::always()
            }
        })
}

/// Whether `target` is `krate`'s or one of its modules'.
fn in_crate(target: &str, krate: &str) -> bool {
    target
        .strip_prefix(krate)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// The spans in which rumqttd 0.20 handles one connection: its network side
/// (`server/broker.rs`) and its router's work for it (`router/routing.rs`, which logs
/// every client's DISCONNECT followed by its close as an error).
const BROKER_LINK_SPANS: [&str; 3] = ["remote_link", "[>] incoming", "[<] outgoing"];

/// Whether `meta` is an event of the embedded broker about one of its connections: one
/// inside a span of [`BROKER_LINK_SPANS`].
fn in_broker_link<S>(meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    meta.is_event()
        && in_crate(meta.target(), "rumqttd")
        && cx
            .lookup_current()
            .is_some_and(|span| span.scope().any(|s| BROKER_LINK_SPANS.contains(&s.name())))
}

/// The network a masked IPv4 client address is shown as: its `/24`.
const MASK_V4: u8 = 24;

/// The network a masked IPv6 client address is shown as: its `/48`.
const MASK_V6: u8 = 48;

/// A ban key as the gateway logs it: an address ban's network whole, or with
/// `log.mask_client_addresses = true` no narrower than [`Client`] shows an address (a
/// `/32` ban as its `/24`, a `/64` as its `/48`; a wider network as it is). Usernames
/// and client ids as they are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Key<'a> {
    pub(crate) key: &'a BanKey,
    pub(crate) masked: bool,
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            BanKey::Addr(net) if self.masked => {
                let widest = match net.network() {
                    IpAddr::V4(_) => MASK_V4,
                    // A 6to4 network carries its site's IPv4 address in bits 16..48.
                    IpAddr::V6(v6) if v6.segments()[0] == 0x2002 => 16,
                    IpAddr::V6(_) => MASK_V6,
                };
                let shown = ClientKey::new(net.network(), net.prefix_len().min(widest));
                write!(f, "addr:{}", shown.unwrap_or(*net))
            }
            key => write!(f, "{key}"),
        }
    }
}

/// A client address as the gateway logs it: whole, or masked to its network (`/24` of
/// IPv4, `/48` of IPv6, without the port; an IPv6 address that carries an IPv4 client,
/// as that client's `/24`) with `log.mask_client_addresses = true`.
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
        // The key of these prefixes: an IPv6 address that carries an IPv4 client
        // (IPv4-mapped, 6to4, Teredo, NAT64) is shown as that client's /24, not as a /48 that
        // would hold a 6to4 site's whole IPv4 address.
        write!(f, "{}", KeyBy::new(MASK_V4, MASK_V6).key(self.addr.ip()))
    }
}
