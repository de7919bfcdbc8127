//! The caller of a request as the routes see it: the filters that ask the `Authenticator`
//! about the connection's certificate and the request's token, record the identity in the
//! request scope, and count and log refusals. They never reject (the handler answers the
//! error), so a matched route cannot fall through to another route.

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;

use super::auth::{AuthFailure, Caller};
use super::conn::ConnInfo;
use super::error::ApiError;
use super::scope::RequestScope;
use super::state::ApiState;
use crate::telemetry::metrics::metrics;

/// Counts and logs a refused call (reason, route, remote, certificate name; never a token).
fn record_failure(failure: &AuthFailure, conn: Option<&ConnInfo>, scope: Option<&RequestScope>) {
    metrics()
        .auth_failures_total
        .with_label_values(&[failure.reason])
        .inc();
    let remote = conn.map(|c| c.remote.to_string()).unwrap_or_default();
    let route = scope.map(RequestScope::route).unwrap_or("unmatched");
    let certificate = failure.certificate.as_deref().unwrap_or("-");
    if failure.reason == "missing_credentials" {
        tracing::info!(
            reason = failure.reason,
            status = failure.status.as_u16(),
            route,
            remote,
            certificate,
            "request refused"
        );
    } else {
        tracing::warn!(
            reason = failure.reason,
            status = failure.status.as_u16(),
            route,
            remote,
            certificate,
            "request refused"
        );
    }
}

/// The decision on a request; never rejects (the handler answers the error), so a matched
/// route cannot fall through to another route. Refusals are counted and logged here.
fn authorized(
    state: Arc<ApiState>,
    always: bool,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    warp::ext::optional::<ConnInfo>()
        .and(warp::ext::optional::<RequestScope>())
        .and(warp::header::headers_cloned())
        .map(
            move |conn: Option<ConnInfo>, scope: Option<RequestScope>, headers: http::HeaderMap| {
                if !always && !state.auth.protects_metrics() {
                    return Ok(Caller::default());
                }
                let caller = match state.auth.authorize(conn.as_ref(), &headers) {
                    Ok(caller) => caller,
                    Err(failure) => {
                        record_failure(&failure, conn.as_ref(), scope.as_ref());
                        return Err(failure.to_api_error());
                    }
                };
                if let (Some(scope), Some(id)) = (scope, caller.identity()) {
                    scope.set_caller(id);
                }
                Ok(caller)
            },
        )
}

/// Protected routes (everything under `/api/` and `/provision`).
pub(crate) fn caller(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    authorized(state, true)
}

/// `/metrics`: open unless `auth.protect_metrics`.
pub(crate) fn metrics_caller(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    authorized(state, false)
}
