//! The route table: every route of the API contract (including the Go service's legacy paths),
//! in groups that each own their rows, joined at one level. Every row's filter is boxed, so the
//! filter type has the same depth however many routes there are (a nested `or` chain over all
//! routes once overflowed the compiler's recursion limit in release builds). Requests no row
//! takes get a JSON 404, or a 405 with `Allow` when the path exists under other methods; both
//! are computed from the table itself.

mod cache;
mod health;
mod images;
mod jobs;
pub(crate) mod route;
mod volumes;

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Method, StatusCode};
use warp::reply::{Reply, Response};

use super::error::{self, ApiError, Reason};
use super::origin;
use super::state::ApiState;
use route::RouteDef;

/// Every group's rows, in the order they are tried.
pub(crate) const GROUPS: &[&[RouteDef]] = &[
    health::ROUTES,
    jobs::ROUTES,
    cache::ROUTES,
    images::ROUTES,
    volumes::ROUTES,
];

/// Every row of the table.
pub(crate) fn table() -> impl Iterator<Item = &'static RouteDef> {
    GROUPS.iter().flat_map(|group| group.iter())
}

/// The API: cross-site refusal (`origin.rs`), then the first row whose method and path match,
/// else the 404/405 answer. Once a row's method and path match, nothing after rejects
/// (handlers answer errors themselves), so no request falls through to another row.
pub(crate) fn routes(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let any_route = table()
        .map(|row| row.filter(state.clone()))
        .fold(unrouted(), |tried, row| row.or(tried).unify().boxed());
    origin::same_site_only(state.auth.clone())
        .and(any_route)
        .recover(error::recover)
        .unify()
}

/// The answer when no row matched: 405 with `Allow` when some row has this path, else 404.
/// Folded in last (each row is tried before everything folded before it, so this one is
/// tried after every row).
fn unrouted() -> BoxedFilter<(Response,)> {
    warp::path::full()
        .and(warp::method())
        .map(|path: warp::path::FullPath, method: Method| unrouted_answer(path.as_str(), &method))
        .boxed()
}

fn unrouted_answer(path: &str, method: &Method) -> Response {
    let allowed = allowed_methods(path);
    if allowed.is_empty() {
        return ApiError::not_found(Reason::RouteNotFound, "no such route").into_response();
    }
    let mut resp = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Reason::MethodNotAllowed,
        format!(
            "method {} is not allowed on this route (allowed: {allowed})",
            method_for_message(method)
        ),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allowed) {
        resp.headers_mut().insert("allow", v);
    }
    resp
}

/// The methods the table serves on `path`, as an `Allow` value (`GET, HEAD, POST`).
fn allowed_methods(path: &str) -> String {
    let mut methods: Vec<&str> = Vec::new();
    for row in table().filter(|row| template_matches(row.template, path)) {
        methods.push(row.method.as_str());
        if row.method == Method::GET {
            methods.push("HEAD");
        }
    }
    methods.sort_unstable();
    methods.dedup();
    methods.join(", ")
}

/// Whether `path` has the shape of `template` (`{name}` stands for one non-empty segment).
fn template_matches(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(h)) if w.starts_with('{') && !h.is_empty() => continue,
            (Some(w), Some(h)) if w == h => continue,
            _ => return false,
        }
    }
}

/// A caller's method, short enough to quote.
fn method_for_message(method: &Method) -> &str {
    let m = method.as_str();
    if m.len() > 16 { "(long method)" } else { m }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_paths_of_their_shape_only() {
        assert!(template_matches("/api/v1/jobs/{id}", "/api/v1/jobs/abc"));
        assert!(!template_matches("/api/v1/jobs/{id}", "/api/v1/jobs/"));
        assert!(!template_matches("/api/v1/jobs/{id}", "/api/v1/jobs/a/b"));
        assert!(template_matches("/health", "/health"));
        assert!(!template_matches("/health", "/healthy"));
    }

    #[test]
    fn allow_lists_every_method_of_a_path() {
        assert_eq!(allowed_methods("/api/v1/jobs"), "GET, HEAD, POST");
        assert_eq!(allowed_methods("/api/v1/volumes/vm-1"), "DELETE");
        assert_eq!(allowed_methods("/nowhere"), "");
    }

    #[test]
    fn every_row_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for row in table() {
            assert!(
                seen.insert((row.method.clone(), row.template)),
                "{} {}",
                row.method,
                row.template
            );
        }
    }

    #[test]
    fn the_route_table_and_the_openapi_document_name_the_same_operations() {
        let doc: serde_json::Value = serde_json::from_str(crate::api::openapi::document()).unwrap();
        let rows: Vec<(String, &str)> = table()
            .map(|row| (row.method.as_str().to_lowercase(), row.template))
            .collect();
        for (method, template) in &rows {
            assert!(
                doc["paths"][template][method].is_object(),
                "{method} {template} is in the route table but not in the OpenAPI document"
            );
        }
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                assert!(
                    rows.iter().any(|(m, p)| m == method && p == path),
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }
}
