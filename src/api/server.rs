//! The API listener: accepts TCP connections (at most `server.max_connections` at once, and
//! `server.max_connections_per_peer` from one client address), hands each to the transport
//! (plain HTTP or TLS) within `server.handshake_timeout`, and serves the warp filter on it with
//! hyper-util (HTTP/1.1 or h2, chosen by ALPN). A connection whose first request has not
//! arrived within `server.first_request_timeout` of the accept is closed, and so is an h2
//! connection with no request in progress for `server.h2_idle_timeout` (pings do not count).
//! Each request is handled in `request.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;
use warp::reply::Response;

use super::activity::Activity;
use super::conn::Endpoint;
use super::conn::{ClientCert, ConnInfo};
use super::peers::PeerSlots;
use super::request::{self, MAX_HEADER_BYTES, MAX_HEADER_FIELDS};
use crate::config::ServerSettings;

/// A connection after the transport handshake.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}

/// The HTTP version a connection speaks, chosen before the first request is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpProtocol {
    /// HTTP/1.1: hyper's header read timeout runs from the start of the connection and again
    /// while a keep-alive connection waits for its next request.
    Http1,
    /// HTTP/2, negotiated with ALPN `h2`.
    Http2,
}

/// A connection after the transport handshake.
pub(crate) struct Established {
    pub(crate) io: Box<dyn Conn>,
    /// The verified client certificate's names, if the client presented one.
    pub(crate) client_cert: Option<ClientCert>,
    pub(crate) protocol: HttpProtocol,
}

/// What a transport handshake yields.
pub(crate) type Accepted = futures::future::BoxFuture<'static, std::io::Result<Established>>;

/// Turns accepted TCP connections into served connections (plain, or TLS in `tls.rs`).
pub(crate) trait Transport: Send + Sync + 'static {
    /// `http` or `https`.
    fn scheme(&self) -> &'static str;

    /// Handshake; returns the stream, the verified client certificate and the protocol.
    fn accept(&self, tcp: TcpStream) -> Accepted;
}

/// Plain HTTP/1.1 (only allowed on loopback addresses unless `tls.allow_insecure_http`).
/// No h2c: HTTP/2 is offered over TLS only, where ALPN picks the protocol without the
/// untimed preface sniffing of an auto-detecting connection.
pub(crate) struct Plain;

impl Transport for Plain {
    fn scheme(&self) -> &'static str {
        "http"
    }

    fn accept(&self, tcp: TcpStream) -> Accepted {
        Box::pin(async move {
            Ok(Established {
                io: Box::new(tcp) as Box<dyn Conn>,
                client_cert: None,
                protocol: HttpProtocol::Http1,
            })
        })
    }
}

/// Listener limits (restart-only settings).
#[derive(Debug, Clone)]
pub(crate) struct ServerLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_peer: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) first_request_timeout: Duration,
    pub(crate) h2_idle_timeout: Duration,
}

impl ServerLimits {
    pub(crate) fn from_settings(server: &ServerSettings) -> ServerLimits {
        ServerLimits {
            max_connections: server.max_connections,
            max_connections_per_peer: server.max_connections_per_peer,
            header_timeout: server.header_timeout,
            handshake_timeout: server.handshake_timeout,
            first_request_timeout: server.first_request_timeout,
            h2_idle_timeout: server.h2_idle_timeout,
        }
    }
}

/// How long a connection asked to close (idle, shutdown) may take to finish its open
/// requests before it is dropped; also the whole server's shutdown wait.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection.
const H2_MAX_STREAMS: u32 = 64;
/// hyper's own header limits, above ours (`request.rs`), so that a request between the two
/// gets our 431 with the JSON body; only beyond these does hyper answer with an empty one.
const HYPER_MAX_HEADER_FIELDS: usize = 4 * MAX_HEADER_FIELDS;
const H2_MAX_HEADER_LIST_BYTES: u32 = 8 * MAX_HEADER_BYTES as u32;

/// What every connection task needs.
struct Shared<F> {
    filter: F,
    transport: Arc<dyn Transport>,
    limits: ServerLimits,
    shutdown: CancellationToken,
}

/// Serves `filter` on `listener` until `shutdown` fires, then lets open requests finish
/// (up to `CLOSE_GRACE`).
pub(crate) async fn serve<F>(
    listener: TcpListener,
    filter: F,
    transport: Arc<dyn Transport>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
    F::Future: Send,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = PeerSlots::new(limits.max_connections_per_peer);
    let mut refusals = RefusalLog::default();
    let shared = Arc::new(Shared {
        filter,
        transport,
        limits,
        shutdown: shutdown.clone(),
    });
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closes"),
        };
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = peers.try_acquire(remote.ip()) else {
            refusals.refused(remote, shared.limits.max_connections_per_peer);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tasks.spawn(async move {
            let _slots = (permit, peer_slot);
            connection(tcp, remote, &shared).await;
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(CLOSE_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within {CLOSE_GRACE:?}");
    }
}

/// Logs connections refused by the per-peer cap at most once a minute (a flood must not
/// flood the log), with how many were refused since the last line.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since_last: u64,
}

impl RefusalLog {
    fn refused(&mut self, remote: SocketAddr, limit: usize) {
        self.since_last += 1;
        tracing::debug!(%remote, "connection refused: server.max_connections_per_peer reached");
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        tracing::warn!(
            %remote,
            limit,
            refused = self.since_last,
            "connections refused: the client holds server.max_connections_per_peer connections \
             (raise it when clients connect through one proxy address)"
        );
        self.last = Some(Instant::now());
        self.since_last = 0;
    }
}

/// One accepted connection: handshake, then HTTP until the peer closes, a limit ends it or the
/// server shuts down.
async fn connection<F>(tcp: TcpStream, remote: SocketAddr, shared: &Shared<F>)
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
    F::Future: Send,
{
    let accepted = Instant::now();
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let limits = &shared.limits;
    let handshake = shared.transport.accept(tcp);
    let established = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return;
        }
    };
    let endpoint = Endpoint {
        scheme: shared.transport.scheme(),
        local,
    };
    let info = ConnInfo {
        remote,
        client_cert: established.client_cert.map(Arc::new),
    };
    let activity = Arc::new(Activity::new());
    let service = {
        let (filter, activity) = (shared.filter.clone(), activity.clone());
        hyper::service::service_fn(move |req| {
            let in_progress = activity.request();
            let served =
                request::handle(warp::service(filter.clone()), info.clone(), endpoint, req);
            async move {
                let response = served.await;
                drop(in_progress);
                response
            }
        })
    };
    let protocol = established.protocol;
    let builder = http_builder(limits, protocol);
    let conn = builder.serve_connection(TokioIo::new(established.io), service);
    tokio::pin!(conn);
    let first_request_by = accepted + limits.first_request_timeout;
    let h2 = protocol == HttpProtocol::Http2;
    // Set once the connection has been asked to close; it is dropped at this instant.
    let mut drop_at: Option<Instant> = None;
    loop {
        let closing = drop_at.is_some();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = activity.no_request_by(first_request_by) => {
                tracing::debug!(%remote, "no request within server.first_request_timeout; closing");
                return;
            }
            _ = activity.idle_for(limits.h2_idle_timeout), if h2 && !closing => {
                tracing::debug!(%remote, "HTTP/2 connection idle for server.h2_idle_timeout; closing");
                conn.as_mut().graceful_shutdown();
                drop_at = Some(Instant::now() + CLOSE_GRACE);
            }
            _ = shared.shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                drop_at = Some(Instant::now() + CLOSE_GRACE);
            }
            _ = tokio::time::sleep_until(drop_at.unwrap_or(accepted)), if closing => {
                tracing::debug!(%remote, "connection did not close within {CLOSE_GRACE:?}; dropped");
                return;
            }
        }
    }
}

/// hyper's settings for one connection of `protocol`.
fn http_builder(limits: &ServerLimits, protocol: HttpProtocol) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(HYPER_MAX_HEADER_FIELDS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    match protocol {
        HttpProtocol::Http1 => builder.http1_only(),
        HttpProtocol::Http2 => builder.http2_only(),
    }
}
