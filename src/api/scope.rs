//! What one request collects on its way through the filters (`RequestScope`: the matched
//! route's template, the caller's identity), read by the server afterwards for metrics, the
//! request span and the log line. A value type: a leaf of `api/`.

use std::sync::{Arc, OnceLock};

/// Values a request collects on its way through the filters, read by the server afterwards
/// for metrics, the request span and the request log line.
#[derive(Clone, Default)]
pub(crate) struct RequestScope(Arc<ScopeInner>);

/// What a `RequestScope` holds (set once each).
#[derive(Default)]
struct ScopeInner {
    /// Template of the first route whose path and method matched (never the raw path).
    route: OnceLock<&'static str>,
    /// Identity of the authenticated caller.
    caller: OnceLock<String>,
}

impl RequestScope {
    pub(crate) fn route(&self) -> &'static str {
        self.0.route.get().copied().unwrap_or("unmatched")
    }

    pub(crate) fn caller(&self) -> Option<&str> {
        self.0.caller.get().map(String::as_str)
    }

    pub(crate) fn set_caller(&self, identity: &str) {
        let _ = self.0.caller.set(identity.to_string());
    }
}

impl RequestScope {
    /// Records the template of the route that matched (first one wins).
    pub(crate) fn set_route(&self, template: &'static str) {
        let _ = self.0.route.set(template);
    }
}
