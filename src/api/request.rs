//! One request on a served connection, around the warp filter: the request-head limits
//! (414/431 with the JSON error body, below hyper's own limits that answer with an empty body),
//! the request scope and connection values handlers read, the request span, the request
//! metrics (bounded labels) and the request log line (bounded fields; reads at debug level,
//! state changes at info).

use std::borrow::Cow;
use std::convert::Infallible;
use std::time::Instant;

use hyper::body::Incoming;
use tower_service::Service;
use tracing::Instrument;
use warp::Reply;
use warp::http::{Method, StatusCode, Version};
use warp::reply::Response;

use super::conn::{ConnInfo, Endpoint};
use super::error::{ApiError, Reason};
use super::scope::RequestScope;
use crate::telemetry::metrics::{method_label, metrics};

/// Longest request target (path and query) served; 414 with the JSON body beyond. The API's
/// paths are short (ids, cache keys, volume names of at most 127 characters).
const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields in one request; 431 with the JSON body beyond.
pub(crate) const MAX_HEADER_FIELDS: usize = 100;
/// Largest header section, counted as HTTP/2 does (name + value + 32 bytes per field); 431
/// with the JSON body beyond.
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Longest method and path written into a log line or span (longer ones are cut).
const MAX_LOGGED_METHOD: usize = 32;
const MAX_LOGGED_PATH: usize = 256;

/// Serves `req` with the warp service `svc`, recording metrics, span and log line.
pub(crate) async fn handle<S>(
    mut svc: S,
    conn: ConnInfo,
    endpoint: Endpoint,
    mut req: hyper::Request<Incoming>,
) -> Result<Response, Infallible>
where
    S: Service<hyper::Request<Incoming>, Response = Response, Error = Infallible>,
{
    let scope = RequestScope::default();
    req.extensions_mut().insert(scope.clone());
    req.extensions_mut().insert(conn.clone());
    req.extensions_mut().insert(endpoint);
    let method = req.method().clone();
    let path = for_log(req.uri().path(), MAX_LOGGED_PATH).into_owned();
    let started = Instant::now();
    let span = request_span(&method, &conn);
    crate::telemetry::extract_remote_parent(&span, req.headers());
    let resp = match check_head(&req) {
        Err(e) => refuse_head(e, req.version()),
        Ok(()) => match svc.call(req).instrument(span.clone()).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
    };
    let outcome = Outcome {
        method: &method,
        path: &path,
        route: scope.route(),
        status: resp.status(),
        seconds: started.elapsed().as_secs_f64(),
        identity: scope.caller(),
        conn: &conn,
        reason: resp.extensions().get::<Reason>().copied(),
    };
    outcome.finish_span(&span);
    outcome.record_metrics();
    let _enter = span.enter();
    outcome.log();
    Ok(resp)
}

/// The request span; the route, status and caller are recorded when the response is known.
/// The method follows OpenTelemetry: a standard method as is, any other as `_OTHER` with
/// the (cut) original in `http.request.method_original`.
fn request_span(method: &Method, conn: &ConnInfo) -> tracing::Span {
    let (standard, original) = match span_method(method) {
        Some(m) => (m, None),
        None => ("_OTHER", Some(for_log(method.as_str(), MAX_LOGGED_METHOD))),
    };
    let span = tracing::info_span!(
        "http_request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = standard,
        http.request.method_original = tracing::field::Empty,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        client.address = %conn.remote,
        enduser.id = tracing::field::Empty,
    );
    if let Some(original) = original {
        span.record("http.request.method_original", original.as_ref());
    }
    span
}

/// The methods HTTP defines (RFC 9110, and PATCH).
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A standard method's name; `None` for any other token.
fn span_method(method: &Method) -> Option<&'static str> {
    STANDARD_METHODS.into_iter().find(|m| *m == method.as_str())
}

/// Refuses a request target or header section beyond our limits.
fn check_head(req: &hyper::Request<Incoming>) -> Result<(), ApiError> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            Reason::UriTooLong,
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        ));
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    if headers.len() > MAX_HEADER_FIELDS || bytes > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::HeadersTooLarge,
            format!(
                "the request headers are larger than {MAX_HEADER_BYTES} bytes or more than \
                 {MAX_HEADER_FIELDS} fields"
            ),
        ));
    }
    Ok(())
}

/// The error body for a refused request head; HTTP/1 connections close after it, since the
/// body that may follow is not read.
fn refuse_head(err: ApiError, version: Version) -> Response {
    let mut resp = err.into_response();
    if version < Version::HTTP_2 {
        resp.headers_mut().insert(
            warp::http::header::CONNECTION,
            warp::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// What a finished request is recorded with.
struct Outcome<'a> {
    method: &'a Method,
    /// The request path, cut to `MAX_LOGGED_PATH`.
    path: &'a str,
    /// The route template (`unmatched` when none matched).
    route: &'static str,
    status: StatusCode,
    seconds: f64,
    identity: Option<&'a str>,
    conn: &'a ConnInfo,
    /// The error body's reason, when the answer is one.
    reason: Option<Reason>,
}

impl Outcome<'_> {
    /// Names the span after the route (tracing-opentelemetry applies a late `otel.name` only
    /// before the span has started, so the OpenTelemetry span is renamed directly as well).
    fn finish_span(&self, span: &tracing::Span) {
        let name = format!(
            "{} {}",
            span_method(self.method).unwrap_or("HTTP"),
            self.route
        );
        span.record("otel.name", name.as_str());
        {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.context().span().update_name(name);
        }
        if self.status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        span.record("http.route", self.route);
        span.record("http.response.status_code", self.status.as_u16());
        if let Some(caller) = self.identity {
            span.record("enduser.id", caller);
        }
    }

    fn record_metrics(&self) {
        let m = metrics();
        let method = method_label(self.method.as_str());
        m.requests_total
            .with_label_values(&[method, self.route, self.status.as_str()])
            .inc();
        m.request_duration_seconds
            .with_label_values(&[method, self.route])
            .observe(self.seconds);
    }

    /// Reads (GET, HEAD; health probes and scrapes among them) log at debug level, so a
    /// polling client does not fill the journal; state changes and server errors at info.
    fn log(&self) {
        let method = for_log(self.method.as_str(), MAX_LOGGED_METHOD);
        let (route, path, status, seconds) =
            (self.route, self.path, self.status.as_u16(), self.seconds);
        let remote = self.conn.remote;
        let identity = self.identity.unwrap_or("-");
        let reason = self.reason.map_or("", Reason::as_str);
        let read = matches!(*self.method, Method::GET | Method::HEAD);
        if read && !self.status.is_server_error() {
            tracing::debug!(method = %method, route, path, status, reason, seconds, %remote, identity, "request");
        } else {
            tracing::info!(method = %method, route, path, status, reason, seconds, %remote, identity, "request");
        }
    }
}

/// `value` cut to at most `max` bytes (at a character boundary), marked with `...`.
fn for_log(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max {
        return Cow::Borrowed(value);
    }
    let mut cut = max;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}...", &value[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_values_are_cut() {
        assert_eq!(for_log("GET", MAX_LOGGED_METHOD), "GET");
        let long = "X".repeat(400_000);
        assert_eq!(for_log(&long, 32).len(), 35);
        assert_eq!(for_log("ééé", 3), "é...");
    }

    #[test]
    fn span_methods_are_standard_or_none() {
        assert_eq!(span_method(&Method::PATCH), Some("PATCH"));
        assert_eq!(span_method(&Method::DELETE), Some("DELETE"));
        assert_eq!(span_method(&Method::from_bytes(b"BREW").unwrap()), None);
    }
}
