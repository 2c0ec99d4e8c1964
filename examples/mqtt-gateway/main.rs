//! `mqtt-gateway`: a hardened MQTT proxy built from every Aegis layer, with an embedded
//! broker so that it runs on a machine with no broker installed.
//!
//! ```text
//! cargo run --release --example mqtt-gateway -- [--config FILE] [--listen ADDR]
//!     [--upstream ADDR|embedded] [--metrics ADDR]
//! ```
//!
//! Defaults: MQTT on `127.0.0.1:1883`, upstream `embedded` (rumqttd in-process on a free
//! loopback port, MQTT 3.1.1), metrics on `127.0.0.1:9090`. Flags override the file.
//! Every configuration key, with its default, is in `CONFIG.md` beside this file, and
//! `gateway.example.toml` sets them all. To poke it:
//!
//! ```text
//! mosquitto_sub -h 127.0.0.1 -p 1883 -t demo -V mqttv311 &
//! mosquitto_pub -h 127.0.0.1 -p 1883 -t demo -m hello -V mqttv311
//! curl -s 127.0.0.1:9090/metrics | grep aegis_
//! curl -i 127.0.0.1:1883/                      # HTTP on the MQTT port: closed, counted
//! curl -i 127.0.0.1:9090/readyz                # 200 while the broker is reachable
//! ```
//!
//! The embedded broker speaks MQTT 3.1.1 only (the gateway answers MQTT 5 and 3.1
//! clients with an "unsupported version" CONNACK). For those, use a real broker:
//! `mosquitto -p 1884 &` then `--upstream 127.0.0.1:1884`. The embedded broker is for
//! trying the gateway, not for production (see `broker.rs`): with it, `--listen` must
//! be a loopback address.
//!
//! The stack, outermost first: the accept loop (connection cap, `TCP_NODELAY`) -> PROXY
//! protocol -> security (bans, the anomaly detector, the event log) -> connection rate
//! limit -> slowloris deadlines -> sniffing (MQTT only) -> strict MQTT validation (with
//! the per-packet policy and payload inspection) -> authentication -> the proxy, whose
//! upstream connector runs under a circuit breaker and the adaptive controller's latency
//! probe. Each layer has an `enabled` switch (authentication: `auth.kind`). See
//! `stack.rs`.
//!
//! SIGINT or SIGTERM stops accepting, writes `security.bans_file` (if set) and drains
//! for `server.drain_timeout`; a second SIGINT or SIGTERM during the drain ends the
//! process at once. SIGHUP does neither: the gateway has no reload (restart it to apply
//! a changed configuration), so it logs a warning and keeps running, as a daemon
//! detached from its terminal should. Exit status: 0 when every connection ended within the drain, 1 when
//! some were aborted (the drain ran out of time or a second signal cut it) or the
//! gateway could not start, 2 for a configuration or command-line error.
//!
//! The command line is parsed with clap's derive API, without its default features
//! (no colours or suggestions): rumqttd already depends on clap, so it costs no new
//! crate, and `--help` comes for free.

mod bans_file;
mod bans_json;
mod broker;
mod config;
mod drain_reports;
#[path = "../shared/log_writer.rs"]
mod log_writer;
mod logging;
#[path = "../shared/metrics_endpoint.rs"]
mod metrics_endpoint;
mod metrics_http;
#[path = "../shared/nofile.rs"]
mod nofile;
mod open_files;
mod panics;
mod stack;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aegis_core::serve;
use aegis_layers::proxy_protocol::ProxyProtocolLayer;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError, Settings, Upstream};

/// A hardened MQTT gateway: every Aegis layer in front of a broker.
#[derive(Debug, Parser)]
#[command(name = "mqtt-gateway", version)]
struct Cli {
    /// TOML configuration file (every key optional; see CONFIG.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for MQTT clients [file: server.listen; default 127.0.0.1:1883].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The broker: an address, or `embedded` for the in-process one [file:
    /// server.upstream; default embedded].
    #[arg(long, value_name = "ADDR|embedded")]
    upstream: Option<String>,
    /// Address of /metrics, /healthz and /readyz [file: metrics.listen; default
    /// 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Check the configuration, print the effective settings as TOML and exit (0 if
    /// valid). See CONFIG.md for what "effective" covers.
    #[arg(long)]
    check: bool,
}

/// Exit status for a configuration error (clap uses the same for a bad command line).
const EXIT_CONFIG: u8 = 2;

/// Exit status when a second signal ends the drain: connections were cut, as when the
/// drain runs out of time.
const EXIT_FORCED: u8 = 1;

/// How long a second signal's exit waits for its log line to reach stderr.
const SECOND_SIGNAL_LOG: std::time::Duration = std::time::Duration::from_millis(200);

/// How long the stopping gateway waits for the last write of the bans file, after the
/// drain. A stop takes `server.drain_timeout` (22 s by default), then the time to abort
/// the connections still open (2.1 s for some 9,600, measured; the other runtimes of
/// `"per-core"` are waited for [`REPORT_MARGIN`] at most), then up to this: about 27 s by
/// default, under Kubernetes' default grace period of 30 s (and up to a second more to
/// write out the last log lines, when stderr is slow). A longer drain needs a longer grace
/// period (`terminationGracePeriodSeconds`), by at least 8 s.
const LAST_BANS_WRITE: std::time::Duration = std::time::Duration::from_secs(3);

/// With `server.runtime = "per-core"`, how long past the drain deadline the stopping
/// gateway waits for the other runtimes' reports of their drains: time for each to abort
/// the connections still open (2.1 s for some 9,600, measured). A runtime that has not
/// reported by then (its thread stalled) counts as not drained, and the stop goes on
/// without it.
const REPORT_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The MQTT listener's backlog, as `TcpListener::bind`'s.
const BACKLOG: u32 = 1024;

/// The runtimes besides the accepting one that `runtime` serves from: one for each core
/// but the first with `"per-core"`; `None` with `"work-stealing"`, or on one core (per
/// core is then one runtime, served as usual).
fn other_runtimes(runtime: config::Runtime) -> Option<std::num::NonZeroUsize> {
    match runtime {
        config::Runtime::PerCore => std::thread::available_parallelism()
            .ok()
            .and_then(|n| std::num::NonZeroUsize::new(n.get() - 1)),
        config::Runtime::WorkStealing => None,
    }
}

/// Binds the MQTT listener as `TcpListener::bind` does (`SO_REUSEADDR`, a backlog of
/// [`BACKLOG`]), with `TCP_NODELAY` set before it listens when asked: the sockets it accepts
/// inherit it (Linux), and `serve` skips setting it on each.
fn bind(addr: SocketAddr, nodelay: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(nodelay)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// jemalloc on Linux with glibc (see `examples/Cargo.toml` for why); elsewhere the
/// system allocator.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match load(&cli) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check {
        print!("{}", checked(&settings));
        return ExitCode::SUCCESS;
    }
    logging::init(&settings.raw.log);
    // Panics through `tracing` from now on (JSON logs stay JSON), and a panic of the
    // embedded broker's turns /readyz to 503.
    panics::install();
    // Per core: this thread's runtime accepts and serves its share; `serve_per_core`
    // starts the others.
    let runtime = match match settings.raw.server.runtime {
        config::Runtime::WorkStealing => tokio::runtime::Runtime::new(),
        config::Runtime::PerCore => current_thread_runtime(),
    } {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(settings));
    // The embedded broker's threads and the metrics endpoint end with the process.
    runtime.shutdown_background();
    logging::finish();
    ExitCode::from(code)
}

/// The configuration `--check` prints ([`checked`]): as the gateway would run it, where
/// that differs from the file. `inspect.enabled` is off without the MQTT layer (inspection
/// runs inside it), and `server.max_connections` is cut to what the open-files limit
/// allows, as [`serve_until_signal`] cuts it (the soft limit raised to the hard one
/// first): this process's limit, which a service manager's (`LimitNOFILE=`) may not be.
/// A cut is said on stderr, and so is a set `RUST_LOG`, which replaces `log.level` at
/// start-up: stdout stays a configuration file, with `log.level` as configured.
fn effective(settings: &Settings) -> Config {
    let mut c = settings.raw.clone();
    c.inspect.enabled = settings.inspector.is_some();
    let configured = c.server.max_connections;
    let open_files::Budget {
        limit,
        per_client,
        held,
        cap,
        ..
    } = budget(&c, settings.upstream, other_runtimes(c.server.runtime));
    if let Some(limit) = limit.filter(|_| cap < configured) {
        eprintln!(
            "note: server.max_connections = {cap}, cut from {configured}: this process's \
             open-files limit is {limit} ({} kept for the gateway, {held} for its other \
             runtimes and the connections queued for them, {per_client} a client); the \
             gateway started under another limit gets another cap",
            nofile::FD_RESERVE
        );
        c.server.max_connections = cap;
    }
    if let Some(filter) = logging::rust_log() {
        let falls_back = if tracing_subscriber::EnvFilter::try_new(&filter).is_ok() {
            ""
        } else {
            ", and is not a tracing filter: the gateway would log at \"info\""
        };
        eprintln!(
            "note: log.level: RUST_LOG is set ({filter:?}) and replaces it at start-up{falls_back}"
        );
    }
    c
}

/// The open-files budget of a gateway run with `c` and `upstream`, serving from the
/// accepting runtime and `others` ([`other_runtimes`]), under this process's open-files
/// limit, the soft one raised to the hard one first ([`nofile::raise`]): the same for
/// `--check` ([`effective`]) as for the run ([`serve_until_signal`]), and the same
/// function of the limit, the runtimes and the configuration ([`open_files::budget`]).
fn budget(
    c: &Config,
    upstream: Upstream,
    others: Option<std::num::NonZeroUsize>,
) -> open_files::Budget {
    open_files::budget(
        c.server.max_connections,
        descriptors_per_client(upstream),
        nofile::raise(),
        others,
    )
}

/// The descriptors of this process each proxied client holds, with `upstream`.
fn descriptors_per_client(upstream: Upstream) -> u64 {
    match upstream {
        Upstream::Embedded => broker::DESCRIPTORS_PER_CLIENT,
        Upstream::Addr(_) => nofile::DESCRIPTORS_PER_CLIENT,
    }
}

/// What `--check` prints: the [`effective`] configuration as TOML, with comments where
/// the embedded broker changes what a key means: on `mqtt.client_id_chars`, which it
/// narrows (`stack.rs`, `EMBEDDED_REFUSED_CHARS`), and on `mqtt.enabled = false`, which
/// leaves client ids unchecked ([`broker::UNCHECKED_CLIENT_IDS`]). Still a configuration
/// file that gives the same settings.
fn checked(settings: &Settings) -> String {
    let toml = effective(settings).to_toml();
    if settings.upstream != Upstream::Embedded {
        return toml;
    }
    let mqtt = settings.raw.mqtt.enabled;
    let mut out = String::with_capacity(toml.len() + 256);
    let mut section = "";
    for line in toml.lines() {
        if line.starts_with('[') {
            section = line;
        }
        out.push_str(line);
        if section == "[mqtt]" {
            if mqtt && line.starts_with("client_id_chars = ") {
                out.push_str(
                    "  # with upstream \"embedded\": and none of + $ # / (rumqttd refuses \
                     them, and then fails every client's CONNECT)",
                );
            } else if !mqtt && line == "enabled = false" {
                out.push_str("  # warning: ");
                out.push_str(broker::UNCHECKED_CLIENT_IDS);
            }
        }
        out.push('\n');
    }
    out
}

/// Reads the file (if any), applies the flags over it and validates the result.
fn load(cli: &Cli) -> Result<Settings, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(&origin, format!("cannot read: {e}")))?;
            Config::parse(&text, &origin)?
        }
        None => Config::default(),
    };
    if let Some(listen) = &cli.listen {
        config.server.listen.clone_from(listen);
    }
    if let Some(upstream) = &cli.upstream {
        config.server.upstream.clone_from(upstream);
    }
    if let Some(metrics) = &cli.metrics {
        config.metrics.listen.clone_from(metrics);
        config.metrics.enabled = true;
    }
    config.validate()
}

/// Runs the gateway until a signal and its drain; returns the exit status.
async fn run(settings: Settings) -> u8 {
    match serve_until_signal(settings).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("mqtt-gateway: {e}");
            1
        }
    }
}

async fn serve_until_signal(mut settings: Settings) -> Result<u8, String> {
    // Read with the configuration; put in place once the stack is built.
    let saved_bans = settings.bans.take();
    // Signals first, so a SIGTERM right after start-up already drains.
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    // SIGHUP, many daemons' "reload" (and a closed terminal's hang-up), would kill the
    // process by its default action: no drain, and the bans since the last write of the
    // bans file lost. There is no reload: it is logged and the gateway keeps running.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::warn!(
                signal = "SIGHUP",
                "SIGHUP: the gateway has no reload and keeps running; restart it to apply a \
                 changed configuration (SIGTERM or SIGINT drains it first)"
            );
        }
    });

    let c = &settings.raw;
    let prometheus = metrics_http::install_recorder()?;

    // The gateway's own ports are bound before the embedded broker takes a free one:
    // the kernel then never gives the broker a fixed `listen` or `metrics.listen` port
    // (inside the ephemeral range, it could have, and the gateway's bind failed). The
    // MQTT port is bound before the metrics port: once /healthz answers, both listen.
    // Nothing is accepted on either until the stack is built and the bans restored.
    let listener = bind(settings.listen, c.server.nodelay)
        .map_err(|e| format!("server.listen {}: cannot bind: {e}", settings.listen))?;
    let listen: SocketAddr = listener.local_addr().unwrap_or(settings.listen);
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some((
            addr,
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("metrics.listen {addr}: cannot bind: {e}"))?,
        )),
        None => None,
    };

    // The runtimes to serve from, and the soft open-files limit raised to the hard one,
    // the cap kept within it, those runtimes' own descriptors and the sockets queued for
    // them counted, the queues sized to the limit (as `effective` computes it for --check).
    let others = other_runtimes(c.server.runtime);
    let open_files::Budget {
        cap: max_connections,
        queue,
        ..
    } = budget(c, settings.upstream, others);
    let upstream = match settings.upstream {
        Upstream::Embedded => {
            panics::register_broker_counter();
            let addr = broker::start(c.mqtt.max_packet_size).await?;
            tracing::warn!(
                broker = %addr,
                "upstream = \"embedded\" is for trying the gateway, not for production: \
                 the in-process broker has no authentication, any local process can connect \
                 to it directly, and it keeps every topic filter's messages in memory; point \
                 server.upstream at a real broker"
            );
            if !c.mqtt.enabled {
                tracing::warn!(broker = %addr, "{}", broker::UNCHECKED_CLIENT_IDS);
            }
            addr
        }
        Upstream::Addr(addr) => addr,
    };
    let built = stack::build(&settings, upstream);
    // Bans kept from the last run are in place before any connection is accepted.
    if !c.security.enabled && !c.security.bans_file.is_empty() {
        tracing::warn!("security.bans_file is ignored: security.enabled = false");
    }
    let bans_file = built
        .security
        .clone()
        .filter(|_| !c.security.bans_file.is_empty())
        .map(|security| (PathBuf::from(&c.security.bans_file), security));
    if let Some((path, security)) = &bans_file {
        match bans_file::restore(path, security, saved_bans) {
            Some(n) => tracing::info!(restored = n, file = %path.display(), "bans restored"),
            None => tracing::info!(file = %path.display(), "no bans file yet"),
        }
    }
    // The bans are written at the first signal and again after the drain.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let bans_writer = bans_file.map(|(path, security)| {
        let file = path.clone();
        let (every, loaded) = (c.security.bans_save_every, security.ban_changes());
        let signalled = async {
            let _ = signalled_rx.await;
        };
        let drained = async {
            let _ = drained_rx.await;
        };
        let writer = tokio::spawn(bans_file::keep(
            path, security, loaded, every, signalled, drained,
        ));
        (file, writer)
    });

    let stopping = Arc::new(AtomicBool::new(false));
    let metrics_addr = match metrics_listener {
        Some((addr, listener)) => {
            let bound = listener.local_addr().unwrap_or(addr);
            let ready = metrics_http::Readiness {
                upstream,
                embedded: settings.upstream == Upstream::Embedded,
                timeout: c.metrics.readiness_timeout,
                breaker: built.breaker.clone(),
                stopping: Arc::clone(&stopping),
                last_probe: Arc::default(),
            };
            let admin = metrics_http::Admin {
                security: built.security.clone(),
                writable: c.security.admin,
                token: Some(c.security.admin_token.expose())
                    .filter(|t| !t.is_empty())
                    .map(Arc::from),
                // The configured address, not the bound one: `0.0.0.0` is beyond loopback.
                loopback: addr.ip().to_canonical().is_loopback(),
                masked: c.log.mask_client_addresses,
            };
            let key_by =
                aegis_layers::rate_limit::KeyBy::new(c.limits.ipv4_prefix, c.limits.ipv6_prefix);
            tokio::spawn(metrics_http::serve(
                listener, prometheus, ready, admin, key_by,
            ));
            Some(bound)
        }
        None => None,
    };

    let upstream_text = match settings.upstream {
        Upstream::Embedded => format!("embedded rumqttd (MQTT 3.1.1) on {upstream}"),
        Upstream::Addr(_) => upstream.to_string(),
    };
    tracing::info!(
        %listen,
        upstream = %upstream_text,
        metrics = %metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        layers = %built.layers.join(" -> "),
        max_connections,
        "mqtt-gateway listening"
    );

    // Held for the life of the server: shutting the controller down is the handle's.
    let _adaptive = built.adaptive;
    let shutdown = {
        let stopping = Arc::clone(&stopping);
        async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            stopping.store(true, Ordering::Release);
            let _ = signalled_tx.send(());
            tracing::info!(
                signal = which,
                "stopping: refusing new connections, draining (a second signal ends the process at once)"
            );
            // A second signal ends the drain at once: the operator (or a supervisor) who
            // sends it does not want to wait for `server.drain_timeout`.
            tokio::spawn(async move {
                let which = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                // Queued, never blocking (`logging`); the line is given a moment to
                // reach stderr, no more: a stderr nobody reads must not keep the process.
                tracing::warn!(
                    signal = which,
                    status = EXIT_FORCED,
                    "second signal: exiting at once, open connections cut"
                );
                logging::flush(SECOND_SIGNAL_LOG);
                std::process::exit(EXIT_FORCED.into());
            });
        }
    };
    // One cap however many runtimes serve (validated: 1..=u32::MAX).
    let cap = aegis_core::serve::ConnectionCap::new(
        usize::try_from(max_connections).unwrap_or(usize::MAX),
    );
    // A banned or denied address is refused in the accept loop, before a task is spawned
    // for it; not a trusted PROXY protocol sender, whose address the loop sees instead of
    // its clients' (the security layer refuses a client's banned address after the
    // header). Any other peer is its own client, with `proxy_protocol` on too: the PROXY
    // layer passes it on unread.
    let admit = built.security.clone().map(|security| Admit {
        security,
        trusted: if c.proxy_protocol.enabled {
            // As the PROXY layer holds them: an IPv4-mapped network as its IPv4 one, the
            // form a peer is matched in.
            ProxyProtocolLayer::new(settings.trusted.iter().copied())
                .trusted()
                .into()
        } else {
            Arc::default()
        },
    });
    let (drained, aborted) = match others {
        Some(others) => {
            serve_per_core(
                listener,
                built.service,
                &c.server,
                (others, queue),
                cap,
                admit,
                shutdown,
            )
            .await?
        }
        None => {
            let report = serve_with(listener, built.service, &c.server, cap, admit, shutdown).await;
            (report.drained(), report.aborted())
        }
    };
    // The last write of the bans, after the drain: bounded, so that a stuck disk does
    // not keep a stopping gateway past its supervisor's grace period (the file is
    // replaced by a rename, so a write cut short leaves the previous one whole).
    let _ = drained_tx.send(());
    if let Some((file, writer)) = bans_writer {
        match tokio::time::timeout(LAST_BANS_WRITE, writer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                file = %file.display(),
                error = %e,
                "the bans file writer failed: the last bans are not written"
            ),
            Err(_) => tracing::warn!(
                file = %file.display(),
                timeout = ?LAST_BANS_WRITE,
                "the last bans file write did not finish in time: the last bans may not be written"
            ),
        }
    }
    tracing::info!(drained, aborted, "stopped");
    Ok(u8::from(!drained))
}

fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The accept loop's check of each peer's address against the bans and `security.deny`
/// (`Security::refuse_banned`), but for the trusted PROXY protocol senders (`trusted`,
/// empty with `proxy_protocol` off): their address is not their clients'.
#[derive(Clone)]
struct Admit {
    security: aegis_mqtt::security::Security,
    trusted: Arc<[ipnet::IpNet]>,
}

impl Admit {
    fn check(&self, peer: SocketAddr) -> Result<(), aegis_core::BoxError> {
        // Matched as the PROXY protocol layer does, IPv4-mapped IPv6 folded to IPv4.
        let ip = peer.ip().to_canonical();
        if self.trusted.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        self.security.refuse_banned(peer)
    }
}

/// One accept loop with the `[server]` settings, the connection cap `cap` and the
/// address bans of `admit`, until `signal` and its drain.
fn serve_with<L, S>(
    listener: L,
    service: S,
    server: &config::Server,
    cap: aegis_core::serve::ConnectionCap,
    admit: Option<Admit>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> aegis_core::serve::ServeFuture
where
    L: aegis_core::serve::Listener,
    S: tower::Service<aegis_core::Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<aegis_core::BoxError>,
{
    let mut server = serve(listener, service)
        .connection_cap(cap)
        .nodelay(server.nodelay)
        .drain_timeout(server.drain_timeout);
    if let Some(admit) = admit {
        server = server.admit(move |peer| admit.check(peer));
    }
    server.with_graceful_shutdown(signal).into_future()
}

/// `server.runtime = "per-core"`: this runtime accepts, keeps a connection while it
/// serves no more than its share, and hands the others out in turn to current-thread
/// runtimes on threads of their own (`aegis_core::serve::share_out`, by load), at most
/// `queue` sockets waiting for each (`others`: the runtimes and that queue). All
/// share the one connection cap `cap`; one signal stops them all. Returns whether every
/// runtime drained, and how many connections were aborted in all.
async fn serve_per_core<S>(
    listener: TcpListener,
    service: S,
    server: &config::Server,
    (others, queue): (std::num::NonZeroUsize, usize),
    cap: aegis_core::serve::ConnectionCap,
    admit: Option<Admit>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(bool, usize), String>
where
    S: tower::Service<aegis_core::Conn<tokio::net::TcpStream>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<aegis_core::BoxError>,
{
    // Small, and counted in the descriptors the cap leaves free (`open_files::queue_len`).
    let (acceptor, shards) = aegis_core::serve::share_out(listener, others, queue);
    // By load (all the runtimes share `cap`): at low load every connection stays here,
    // with no wake-up of another core.
    let acceptor = acceptor.by_load();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut reports = Vec::with_capacity(shards.len());
    for (i, shard) in shards.into_iter().enumerate() {
        let runtime = current_thread_runtime().map_err(|e| format!("runtime {}: {e}", i + 1))?;
        let (service, server, cap) = (service.clone(), server.clone(), cap.clone());
        let mut stopped = stopped.clone();
        let (report, reported) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("aegis-runtime-{}", i + 1))
            .spawn(move || {
                let signal = async move {
                    // Stops too if the main runtime is gone.
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                // The acceptor's loop admits every connection before it hands it out.
                let done = runtime.block_on(serve_with(shard, service, &server, cap, None, signal));
                let _ = report.send((done.drained(), done.aborted()));
            })
            .map_err(|e| format!("runtime {}: {e}", i + 1))?;
        reports.push(reported);
    }
    tracing::info!(
        runtimes = others.get() + 1,
        max_connections = cap.max(),
        "serving from one runtime per core"
    );
    // When the stop was signalled: the other runtimes' drain deadline is reckoned from it.
    let signalled = Arc::new(std::sync::OnceLock::new());
    let signal = {
        let signalled = Arc::clone(&signalled);
        async move {
            signal.await;
            let _ = signalled.set(tokio::time::Instant::now());
            let _ = stop.send(true);
        }
    };
    let mine = serve_with(acceptor, service, server, cap, admit, signal).await;
    // A runtime whose report is late (its thread stalled) does not hold the stop: its
    // report is waited for until the drain deadline and a margin for the abort, no more.
    let since = signalled
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now);
    let deadline = since + server.drain_timeout + REPORT_MARGIN;
    let gathered = drain_reports::gather((mine.drained(), mine.aborted()), reports, deadline).await;
    Ok((gathered.drained, gathered.aborted))
}
