//! The accept loop: TLS over TCP, HTTP/1.1 and HTTP/2 through hyper, with every connection
//! bounded (see [`crate::limits`]): how many are open, how many from one address, how long the
//! handshake and the first request may take, how long one may sit idle, how many HTTP/2 streams
//! and how many header bytes it may use.
//!
//! Written here rather than taken from axum-server because these bounds need a hand on each
//! connection: an idle HTTP/2 connection is ended with GOAWAY (hyper's graceful shutdown of that
//! one connection), so a client that sends a request at that moment has it refused cleanly and
//! retries on a new connection, instead of losing it to a closed socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::limits::Limits;
use crate::metrics::{Metrics, Shed};

/// The TLS configuration new handshakes get; replaced when the certificate changes (open
/// connections keep the one they started with).
pub struct TlsCell(RwLock<Arc<ServerConfig>>);

impl TlsCell {
    pub fn new(config: Arc<ServerConfig>) -> Arc<TlsCell> {
        Arc::new(TlsCell(RwLock::new(config)))
    }

    pub fn get(&self) -> Arc<ServerConfig> {
        self.0.read().expect("tls lock").clone()
    }

    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().expect("tls lock") = config;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Stop accepting, let open requests finish (for at most the duration), then stop.
    Graceful(Option<Duration>),
    Now,
}

/// Waits until the stop state satisfies `f` and returns it (`None`: the handle is gone). The
/// watch guard is not kept across an await, so the futures stay `Send`.
async fn stop_when(rx: &mut watch::Receiver<Stop>, f: impl FnMut(&Stop) -> bool) -> Option<Stop> {
    rx.wait_for(f).await.ok().map(|s| *s)
}

/// Tells a running [`serve`] where it listens and when to stop.
#[derive(Clone)]
pub struct Handle {
    addr: watch::Sender<Option<Option<SocketAddr>>>,
    stop: watch::Sender<Stop>,
}

impl Default for Handle {
    fn default() -> Self {
        Handle::new()
    }
}

impl Handle {
    pub fn new() -> Handle {
        Handle {
            addr: watch::channel(None).0,
            stop: watch::channel(Stop::Running).0,
        }
    }

    /// The address once the server listens; `None` if it could not bind.
    pub async fn listening(&self) -> Option<SocketAddr> {
        let mut rx = self.addr.subscribe();
        let seen = rx.wait_for(Option::is_some).await.ok()?;
        (*seen).flatten()
    }

    /// Stops now: no more connections, open ones are dropped.
    pub fn shutdown(&self) {
        self.stop.send_replace(Stop::Now);
    }

    /// Stops accepting; open connections finish their requests (HTTP/2: GOAWAY) for at most
    /// `grace`, then are dropped.
    pub fn graceful_shutdown(&self, grace: Option<Duration>) {
        self.stop.send_replace(Stop::Graceful(grace));
    }
}

/// Something counted per peer address (open connections here, reviews in flight in the gate).
#[derive(Default)]
pub(crate) struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One unit of a peer's share, given back when dropped.
pub(crate) struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// Whether no peer holds anything.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.lock().expect("peers lock").is_empty()
    }

    /// One more for `ip`, unless it holds `max` already.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().expect("peers lock");
        let n = map.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().expect("peers lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What a connection is doing, for its idle timer.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the last request ended (0: none yet).
    last_ms: AtomicU64,
    /// Woken when a request ends, so the idle timer starts over.
    ended: tokio::sync::Notify,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = a.started.elapsed().as_millis().max(1) as u64;
        a.last_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.ended.notify_one();
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection counts as idle if nothing happens: `first` after it opened if no
    /// request came yet, `idle` after the last request ended; `None` while a request runs.
    fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_ms.load(Ordering::Acquire) {
            0 => self.started + first,
            ms => self.started + Duration::from_millis(ms) + idle,
        })
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes)
        .keep_alive_interval(limits.keep_alive_interval)
        .keep_alive_timeout(limits.keep_alive_interval)
        // HTTP/2 rapid reset (CVE-2023-44487) and streams the server itself resets.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(64);
    b
}

/// Serves `router` over TLS on `addr` until `handle` says stop, within `limits`.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<TlsCell>,
    router: Router,
    handle: Handle,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            handle.addr.send_replace(Some(None));
            return Err(e);
        }
    };
    handle.addr.send_replace(Some(listener.local_addr().ok()));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers::default());
    let builder = Arc::new(builder(&limits));
    let mut stop = handle.stop.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop_when(&mut stop, |s| *s != Stop::Running) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: the listener is fine, wait a moment.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.shed(Shed::Connections);
            tracing::debug!(%peer, "closing a connection: --max-connections are open");
            continue;
        };
        let Some(peer_slot) = peers.take(peer.ip(), limits.max_connections_per_peer) else {
            metrics.shed(Shed::ConnectionsPerPeer);
            tracing::debug!(%peer, "closing a connection: --max-connections-per-peer are open from it");
            continue;
        };
        tokio::spawn(connection(Connection {
            stream,
            tls: tls.get(),
            builder: builder.clone(),
            router: router.clone(),
            stop: stop.clone(),
            limits,
            metrics: metrics.clone(),
            _slots: (slot, peer_slot),
        }));
    }
    drop(listener);
    let state = *stop.borrow();
    let grace = match state {
        Stop::Graceful(grace) => grace,
        _ => Some(Duration::ZERO),
    };
    // Every connection holds a slot until it ends.
    let all = slots.acquire_many(limits.max_connections as u32);
    let ended = match grace {
        Some(g) => tokio::time::timeout(g, all).await.is_ok(),
        None => all.await.is_ok(),
    };
    if !ended {
        handle.stop.send_replace(Stop::Now);
    }
    Ok(())
}

struct Connection {
    stream: TcpStream,
    tls: Arc<ServerConfig>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    stop: watch::Receiver<Stop>,
    limits: Limits,
    metrics: Arc<Metrics>,
    _slots: (OwnedSemaphorePermit, PeerSlot),
}

/// Counts a connection open until it is dropped.
struct Open(Arc<Metrics>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connection(-1);
    }
}

async fn connection(c: Connection) {
    let Connection {
        stream,
        tls,
        builder,
        router,
        mut stop,
        limits,
        metrics,
        _slots,
    } = c;
    metrics.connection(1);
    let _open = Open(metrics.clone());
    // Request/response traffic: do not hold small writes for the peer's delayed ACK.
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let handshake = tokio::time::timeout(
        limits.handshake_timeout,
        tokio_rustls::TlsAcceptor::from(tls).accept(stream),
    );
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, "no TLS handshake within {:?}; closing", limits.handshake_timeout);
                return;
            }
        },
        _ = stop_when(&mut stop, |s| *s == Stop::Now) => return,
    };
    let activity = Arc::new(Activity {
        started: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        ended: tokio::sync::Notify::new(),
    });
    let conn = builder.serve_connection(
        TokioIo::new(stream),
        service(router, activity.clone(), peer.map(|p| p.ip())),
    );
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let deadline = activity.deadline(limits.header_read_timeout, limits.idle_timeout);
        // While a request runs, look again once it must have ended.
        let wake = deadline.unwrap_or_else(|| Instant::now() + limits.request_timeout);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = activity.ended.notified(), if !closing => {}
            _ = tokio::time::sleep_until(wake), if !closing => {
                let idle = activity
                    .deadline(limits.header_read_timeout, limits.idle_timeout)
                    .is_some_and(|d| d <= Instant::now());
                if idle {
                    metrics.idle_connection_closed();
                    tracing::debug!(?peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            now = stop_when(&mut stop, |s| if closing { *s == Stop::Now } else { *s != Stop::Running }) => {
                match now {
                    Some(Stop::Graceful(_)) => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ => return,
                }
            }
        }
    }
}

/// Routes one request, counting it for the connection's idle timer.
fn service(
    router: Router,
    activity: Arc<Activity>,
    peer: Option<IpAddr>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let held = activity.begin();
        let router = router.clone();
        if let Some(ip) = peer {
            req.extensions_mut().insert(crate::limits::Peer(ip));
        }
        async move {
            let response = router.oneshot(req.map(axum::body::Body::new)).await;
            drop(held);
            response
        }
    })
}

/// Serves `router` in a task on a free port of 127.0.0.1 (tests, benchmarks, measurements) and
/// returns where, with the handle that stops it.
pub async fn spawn_local(
    tls: Arc<TlsCell>,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, Handle)> {
    let handle = Handle::new();
    let task = tokio::spawn(serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        tls,
        router,
        handle.clone(),
        limits,
        metrics,
    ));
    match handle.listening().await {
        Some(addr) => Ok((addr, handle)),
        None => Err(match task.await {
            Ok(Err(e)) => e,
            _ => std::io::Error::other("the server stopped before it listened"),
        }),
    }
}
