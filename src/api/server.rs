//! The API listener: accepts TCP connections (at most `server.max_connections` at once),
//! hands each to the transport (plain HTTP or TLS), and serves the warp filter on it with
//! hyper-util (HTTP/1.1 and h2). Per request it adds the request scope and connection info,
//! opens the request span, and records request metrics and the request log line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::Instrument;
use warp::Filter;
use warp::reply::Response;

use super::RequestScope;
use crate::telemetry::metrics::metrics;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
    /// Identities from a verified client certificate (subject CN, DNS and URI SANs).
    pub(crate) client_cert: Option<Arc<ClientCert>>,
}

/// A verified client certificate's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientCert {
    pub(crate) common_name: Option<String>,
    pub(crate) sans: Vec<String>,
}

impl ClientCert {
    /// The name used as identity in logs and `requested_by`.
    pub(crate) fn identity(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.sans.first().cloned())
            .unwrap_or_else(|| "<certificate without names>".into())
    }
}

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
    /// Handshake; returns the stream, the verified client certificate and the protocol.
    fn accept(&self, tcp: TcpStream) -> Accepted;
}

/// Plain HTTP/1.1 (only allowed on loopback addresses unless `tls.allow_insecure_http`).
/// No h2c: HTTP/2 is offered over TLS only, where ALPN picks the protocol without the
/// untimed preface sniffing of an auto-detecting connection.
pub(crate) struct Plain;

impl Transport for Plain {
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

/// Listener limits.
#[derive(Debug, Clone)]
pub(crate) struct ServerLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
}

/// Serves `filter` on `listener` until `shutdown` fires, then lets open requests finish
/// (up to 10 s).
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
    let graceful = GracefulShutdown::new();
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
        let _ = tcp.set_nodelay(true);
        let transport = transport.clone();
        let filter = filter.clone();
        let limits = limits.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let established =
                match tokio::time::timeout(limits.handshake_timeout, transport.accept(tcp)).await {
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
            let conn = ConnInfo {
                remote,
                client_cert: established.client_cert.map(Arc::new),
            };
            let io = established.io;
            let service = hyper::service::service_fn(move |req| {
                handle(warp::service(filter.clone()), conn.clone(), req)
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            let builder = match established.protocol {
                HttpProtocol::Http1 => builder.http1_only(),
                HttpProtocol::Http2 => builder.http2_only(),
            };
            let conn = builder.serve_connection(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within 10s");
    }
}

/// One request: scope, span, metrics, log line.
async fn handle<S>(
    mut svc: S,
    conn: ConnInfo,
    mut req: hyper::Request<Incoming>,
) -> Result<Response, Infallible>
where
    S: Service<hyper::Request<Incoming>, Response = Response, Error = Infallible>,
{
    let scope = RequestScope::default();
    req.extensions_mut().insert(scope.clone());
    req.extensions_mut().insert(conn.clone());
    let method = req.method().clone();
    let started = Instant::now();
    let span = tracing::info_span!(
        "http_request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        client.address = %conn.remote,
        enduser.id = tracing::field::Empty,
    );
    crate::telemetry::extract_remote_parent(&span, req.headers());
    let resp = match svc.call(req).instrument(span.clone()).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let route = scope.route();
    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    // The route is known only now; tracing-opentelemetry applies a late `otel.name` only
    // before the span has started, so rename the OpenTelemetry span directly as well.
    let name = format!("{method} {route}");
    span.record("otel.name", name.as_str());
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        span.context().span().update_name(name);
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    span.record("http.route", route);
    span.record("http.response.status_code", status);
    if let Some(caller) = scope.caller() {
        span.record("enduser.id", caller);
    }
    let m = metrics();
    m.requests_total
        .with_label_values(&[method.as_str(), route, &status.to_string()])
        .inc();
    m.request_duration_seconds
        .with_label_values(&[method.as_str(), route])
        .observe(elapsed);
    let _enter = span.enter();
    let identity = scope.caller().unwrap_or("-");
    if route == "/health" || route == "/readyz" || route == "/metrics" {
        tracing::debug!(method = %method, route, status, seconds = elapsed, remote = %conn.remote, identity, "request");
    } else {
        tracing::info!(method = %method, route, status, seconds = elapsed, remote = %conn.remote, identity, "request");
    }
    Ok(resp)
}
