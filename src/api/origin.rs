//! Cross-site requests are refused before any route runs. The daemon serves no web pages, so
//! a browser sends an `Origin` header only when a page of some other site calls the API (with
//! the user's ambient client certificate, or with no credentials at all when authentication
//! is off on loopback). A request whose `Origin` is present and is not the daemon's own origin
//! (the scheme, address and port the connection came in on) gets 403. With authentication off,
//! the `Host` must also name a loopback address or `localhost`: a DNS-rebound name (a page of
//! `evil.example` whose name now resolves to 127.0.0.1) is same-origin for the browser and
//! sends no `Origin` on GETs, but its `Host` is still `evil.example`.

use std::net::IpAddr;
use std::sync::Arc;

use warp::Filter;
use warp::http::HeaderMap;
use warp::http::header::ORIGIN;
use warp::http::uri::Authority;

use super::auth::Authenticator;
use super::conn::Endpoint;
use super::error::ApiError;

/// Longest `Origin`/`Host` value quoted back in an error message.
const MAX_QUOTED: usize = 100;

/// Rejects (403, JSON body) requests from another site; passes all others.
pub(crate) fn same_site_only(
    auth: Arc<Authenticator>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::ext::optional::<Endpoint>()
        .and(warp::host::optional())
        .and(warp::header::headers_cloned())
        .and_then(
            move |endpoint: Option<Endpoint>, host: Option<Authority>, headers: HeaderMap| {
                let open = auth.is_open();
                async move {
                    check_origin(&headers, endpoint)
                        .and_then(|_| if open { check_host(host) } else { Ok(()) })
                        .map_err(warp::reject::custom)
                }
            },
        )
        .untuple_one()
}

fn check_origin(headers: &HeaderMap, endpoint: Option<Endpoint>) -> Result<(), ApiError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if let Some(endpoint) = endpoint
        && own_origins(endpoint)
            .iter()
            .any(|own| own.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    Err(ApiError::forbidden(
        super::error::Reason::CrossSiteRefused,
        format!(
            "cross-site request refused: Origin `{}` is not this daemon's origin (the API serves \
         no web pages; API clients send no Origin header)",
            quoted(origin)
        ),
    ))
}

/// The `Origin` values a page served by this daemon would send.
fn own_origins(endpoint: Endpoint) -> Vec<String> {
    let Endpoint { scheme, local } = endpoint;
    let port = local.port();
    let mut hosts = vec![match local.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }];
    if local.ip().is_loopback() {
        hosts.push("localhost".into());
    }
    let default_port = match scheme {
        "https" => 443,
        _ => 80,
    };
    let mut origins = Vec::new();
    for host in hosts {
        origins.push(format!("{scheme}://{host}:{port}"));
        if port == default_port {
            origins.push(format!("{scheme}://{host}"));
        }
    }
    origins
}

/// With authentication off (loopback only), the request must name a loopback host.
fn check_host(host: Option<Authority>) -> Result<(), ApiError> {
    let Some(host) = host else {
        return Ok(());
    };
    let name = host.host();
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(ApiError::forbidden(
        super::error::Reason::CrossSiteRefused,
        format!(
            "request refused: Host `{}` is not a loopback address; with no authentication \
         configured the API answers only requests to 127.0.0.1, [::1] or localhost",
            quoted(host.as_str())
        ),
    ))
}

/// `value` cut to `MAX_QUOTED` characters for an error message.
fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(scheme: &'static str, local: &str) -> Option<Endpoint> {
        Some(Endpoint {
            scheme,
            local: local.parse().unwrap(),
        })
    }

    fn with_origin(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, origin.parse().unwrap());
        h
    }

    #[test]
    fn no_origin_passes() {
        assert!(check_origin(&HeaderMap::new(), None).is_ok());
    }

    #[test]
    fn only_the_daemons_own_origin_passes() {
        let local = endpoint("http", "127.0.0.1:8080");
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "HTTP://LOCALHOST:8080",
        ] {
            assert!(check_origin(&with_origin(ok), local).is_ok(), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "https://127.0.0.1:8080",
            "null",
            "http://127.0.0.1:8080.evil.example",
        ] {
            let e = check_origin(&with_origin(bad), local).unwrap_err();
            assert_eq!(e.status, 403, "{bad}");
        }
        let tls = endpoint("https", "[::1]:443");
        assert!(check_origin(&with_origin("https://[::1]"), tls).is_ok());
        assert!(check_origin(&with_origin("https://[::1]:443"), tls).is_ok());
        let public = endpoint("https", "192.0.2.10:8443");
        assert!(check_origin(&with_origin("https://localhost:8443"), public).is_err());
        assert!(check_origin(&with_origin("http://x"), None).is_err());
    }

    #[test]
    fn open_mode_wants_a_loopback_host() {
        let host = |h: &str| Some(h.parse::<Authority>().unwrap());
        for ok in [
            "127.0.0.1:8080",
            "localhost",
            "LocalHost:1",
            "[::1]:8080",
            "127.1.2.3",
        ] {
            assert!(check_host(host(ok)).is_ok(), "{ok}");
        }
        for bad in ["evil.example:8080", "192.0.2.1", "localhost.evil.example"] {
            assert_eq!(check_host(host(bad)).unwrap_err().status, 403, "{bad}");
        }
        assert!(check_host(None).is_ok());
    }

    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quoted(&"é".repeat(300)).chars().count(), MAX_QUOTED + 3);
    }
}
