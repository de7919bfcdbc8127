//! API errors: one type for every 4xx/5xx, rendered as `{"error","message","code","reason"}`,
//! and the mapping of warp's own rejections (unknown route, wrong method...) to the same body.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

pub(crate) use super::reason::Reason;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    /// What programs decide on.
    pub(crate) reason: Reason,
    pub(crate) message: String,
    /// Seconds for a `Retry-After` header (429).
    pub(crate) retry_after: Option<u64>,
}

impl warp::reject::Reject for ApiError {}

/// The body of every 4xx and 5xx answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    /// Short code of the status (`invalid request`, `not found`, `conflict`...), as the Go
    /// service sent it; for people and old clients.
    error: &'a str,
    /// What went wrong and what to do (never a credential).
    message: &'a str,
    /// The HTTP status.
    code: u16,
    /// What programs decide on: a stable code.
    reason: Reason,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, reason: Reason, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request`: a field or parameter is wrong.
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Reason::InvalidRequest, message)
    }

    pub(crate) fn not_found(reason: Reason, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, reason, message)
    }

    pub(crate) fn conflict(reason: Reason, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, reason, message)
    }

    /// 500 `internal_error`.
    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Reason::InternalError,
            message,
        )
    }

    pub(crate) fn forbidden(reason: Reason, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, reason, message)
    }

    /// 429 with `Retry-After: retry_after`.
    pub(crate) fn too_many(
        reason: Reason,
        message: impl Into<String>,
        retry_after: u64,
    ) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, reason, message)
        }
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            Reason::AuthenticationRequired,
            "a valid client certificate or API token is required",
        )
    }

    /// The short code of the body's `error` field.
    pub(crate) fn short_code(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid request",
            StatusCode::UNAUTHORIZED => "authentication required",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not found",
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::REQUEST_TIMEOUT => "request timeout",
            StatusCode::LENGTH_REQUIRED => "length required",
            StatusCode::PAYLOAD_TOO_LARGE => "payload too large",
            StatusCode::URI_TOO_LONG => "uri too long",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request header fields too large",
            StatusCode::TOO_MANY_REQUESTS if self.reason == Reason::QueueFull => "queue full",
            StatusCode::TOO_MANY_REQUESTS => "too many requests",
            StatusCode::UNPROCESSABLE_ENTITY => "unprocessable entity",
            StatusCode::INSUFFICIENT_STORAGE => "insufficient storage",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            s if s.is_server_error() => "internal error",
            _ => "error",
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.short_code(),
            message: &self.message,
            code: self.status.as_u16(),
            reason: self.reason,
        };
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        // For the request log line (`api/request.rs`).
        resp.extensions_mut().insert(self.reason);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                warp::http::HeaderValue::from_static("Bearer realm=\"libvirt-volume-provisioner\""),
            );
        }
        if let Some(secs) = self.retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            resp.headers_mut().insert("retry-after", v);
        }
        resp
    }
}

/// Turns any rejection into the JSON error body (ends every filter chain).
pub(crate) async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let err = if let Some(e) = rejection.find::<ApiError>() {
        e.clone()
    } else if rejection.is_not_found() {
        ApiError::not_found(Reason::RouteNotFound, "no such route")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BodyTooLarge,
            "request body is too large",
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            Reason::LengthRequired,
            "a Content-Length header is required",
        )
    } else if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(format!("the `{}` header is invalid", header.name()))
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::bad_request("invalid query string")
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::UnsupportedMediaType,
            "unsupported media type",
        )
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::internal("internal error")
    };
    Ok(err.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_shape() {
        let resp = ApiError::bad_request("volume_name is required").into_response();
        assert_eq!(resp.status(), 400);
        let bytes = http_body_util_collect(resp).await;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"], "invalid request");
        assert_eq!(v["message"], "volume_name is required");
        assert_eq!(v["code"], 400);
        assert_eq!(v["reason"], "invalid_request");
    }

    async fn http_body_util_collect(resp: Response) -> Vec<u8> {
        use http_body_util::BodyExt;
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }
}
