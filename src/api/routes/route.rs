//! One row of the route table (`RouteDef`: method, template, how to build its filter) and the
//! small filters every row uses. A leaf of `routes/`: the groups import it, it imports none.

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;

use crate::api::error::ApiError;
use crate::api::handlers::Listing;
use crate::api::scope::RequestScope;
use crate::api::state::ApiState;

/// The filter that matches a route's method and marks the request as handled by its
/// template; each row puts it right after its path.
pub(crate) type At = BoxedFilter<()>;

/// One route of the API. The table is data: the server joins the rows at one level (each row
/// boxed, so the filter type never deepens as rows are added), the OpenAPI test reads the
/// methods and templates, and the 404/405 answers are computed from it.
pub(crate) struct RouteDef {
    /// The method; GET rows also answer HEAD.
    pub(crate) method: Method,
    /// The path as the OpenAPI document writes it (`/api/v1/jobs/{id}`); also the `route`
    /// label of the request metrics.
    pub(crate) template: &'static str,
    /// Builds the route's filter from the shared state and its `At` filter.
    pub(crate) build: fn(At, Arc<ApiState>) -> BoxedFilter<(Response,)>,
}

impl RouteDef {
    /// The route's filter, boxed.
    pub(crate) fn filter(&self, state: Arc<ApiState>) -> BoxedFilter<(Response,)> {
        (self.build)(at(self.method.clone(), self.template), state)
    }
}

/// Matches `method` (GET also matches HEAD) and records `template` in the request scope.
fn at(method: Method, template: &'static str) -> At {
    warp::method()
        .and_then(move |m: Method| {
            let ok = m == method || (method == Method::GET && m == Method::HEAD);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
        .and(warp::ext::optional::<RequestScope>())
        .map(move |scope: Option<RequestScope>| {
            if let Some(scope) = scope {
                scope.set_route(template);
            }
        })
        .untuple_one()
        .boxed()
}

/// The shared state, for handlers.
pub(crate) fn with_state(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Arc<ApiState>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// A list request: the caller checked, then the query parsed (`handlers::Listing`).
pub(crate) fn listing(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Result<Listing, ApiError>,), Error = Infallible> + Clone {
    crate::api::caller::caller(state)
        .and(raw_query())
        .map(|caller, raw: String| Listing::parse(caller, &raw))
}

/// The raw query string (empty when there is none).
pub(crate) fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}
