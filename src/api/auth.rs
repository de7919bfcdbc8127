//! Who may call the API: the caller's identity from the verified client certificate or an API
//! token, checked against the configured policy, and the warp filters protected routes use.

use std::sync::{Arc, RwLock};

use std::convert::Infallible;

use warp::Filter;

use super::error::ApiError;
use super::server::ConnInfo;
use super::{ApiState, RequestScope};
use crate::config::Settings;
use crate::jobs::engine::Origin;

/// An authorised caller.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    identity: Option<String>,
}

impl Caller {
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Where a job comes from: the caller and the current trace.
    pub fn origin(&self) -> Origin {
        Origin {
            requested_by: self.identity.clone(),
            trace_context: crate::telemetry::current_trace_context(),
        }
    }
}

/// The access policy, replaced as a whole on reload.
#[derive(Debug, Clone, Default)]
struct Policy {
    protect_metrics: bool,
}

pub struct Authenticator {
    policy: RwLock<Policy>,
}

impl Authenticator {
    pub fn new(settings: &Settings) -> Result<Authenticator, String> {
        Ok(Authenticator {
            policy: RwLock::new(Policy {
                protect_metrics: settings.auth.protect_metrics,
            }),
        })
    }

    fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decides on a request from its connection (client certificate).
    pub fn authorize(
        &self,
        conn: Option<&ConnInfo>,
        _headers: &http::HeaderMap,
    ) -> Result<Caller, ApiError> {
        let identity = conn
            .and_then(|c| c.client_cert.as_ref())
            .map(|c| c.identity());
        Ok(Caller { identity })
    }
}

/// The decision on a request; never rejects (the handler answers the error), so a matched
/// route cannot fall through to another route.
fn authorized(
    state: Arc<ApiState>,
    always: bool,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    warp::ext::optional::<ConnInfo>()
        .and(warp::ext::optional::<RequestScope>())
        .and(warp::header::headers_cloned())
        .map(
            move |conn: Option<ConnInfo>, scope: Option<RequestScope>, headers: http::HeaderMap| {
                if !always && !state.auth.policy().protect_metrics {
                    return Ok(Caller::default());
                }
                let caller = state.auth.authorize(conn.as_ref(), &headers)?;
                if let (Some(scope), Some(id)) = (scope, caller.identity()) {
                    scope.set_caller(id);
                }
                Ok(caller)
            },
        )
}

/// Protected routes (everything under `/api/` and `/provision`).
pub fn caller(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    authorized(state, true)
}

/// `/metrics`: open unless `auth.protect_metrics`.
pub fn metrics_caller(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Result<Caller, ApiError>,), Error = Infallible> + Clone {
    authorized(state, false)
}
