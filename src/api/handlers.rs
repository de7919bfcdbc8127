//! Route handlers: request validation (a bad request never becomes a job), the engine calls
//! behind each route, and the response shapes of the API contract.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use chrono::Utc;
use futures::StreamExt;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use warp::{Filter, Reply};

use super::auth::Caller;
use super::bodies::{CacheFetchBody, ProvisionBody};
use super::error::{ApiError, Reason};
use super::state::ApiState;
use super::views::{
    Accepted, CacheDeleted, CacheImage, CacheList, CancelResponse, ConfigResponse, HealthResponse,
    HealthStatus, JobList, JobLoad, ReadyResponse, StateNames, StatusResponse, VolumeDeleted,
    rfc3339,
};
use crate::image::ImageType;
use crate::image::resolved::{self, RequestError, SourceRequest};
use crate::jobs::delete::{DeleteError, Deletion};
use crate::jobs::engine::{CancelError, Submission, SubmitError, Submitted};
use crate::jobs::idempotency::{self, IdempotencyKey};
use crate::jobs::model::{JobKind, JobSpec, JobStatus};
use crate::telemetry::metrics::metrics;
use crate::volume::{self, VolumeError};
use tracing::Instrument;

pub(crate) const MAX_URL_LEN: usize = 4096;
pub(crate) const MAX_CORRELATION_ID_LEN: usize = 256;
/// Largest accepted volume: 1 PiB.
pub(crate) const MAX_VOLUME_GB: u64 = 1 << 20;
pub(crate) const MAX_LIST_LIMIT: usize = 1000;
/// How long a cancel request waits for a running job to stop and roll back.
const CANCEL_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn json_reply(value: &impl serde::Serialize, status: StatusCode) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// The caller, then the JSON body: credentials are checked first, and a request without them
/// never has its body read (a client that sends none would otherwise hold the connection for
/// `server.body_timeout` before its 401). The body is read with `Content-Type:
/// application/json` (415 otherwise: an HTML form or a `text/plain` fetch from another site
/// cannot send one without a CORS preflight, which the API never grants), within
/// `server.max_body_bytes` (413 beyond, with or without a Content-Length header) and
/// `server.body_timeout` (408 beyond: slow-body clients), with no key repeated in any object
/// (400). Errors go to the handler, so a matched route cannot fall through to another one.
pub(crate) fn caller_and_json_body(
    state: Arc<ApiState>,
) -> impl Filter<
    Extract = (
        Result<Caller, ApiError>,
        Result<serde_json::Value, ApiError>,
    ),
    Error = warp::Rejection,
> + Clone {
    super::caller::caller(state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |caller: Result<Caller, ApiError>, headers: http::HeaderMap, body| {
                let settings = state.settings.current();
                let limit = settings.server.max_body_bytes;
                let timeout = settings.server.body_timeout;
                async move {
                    let body = match &caller {
                        Err(e) => Err(e.clone()),
                        Ok(_) => read_json(&headers, body, limit, timeout).await,
                    };
                    (caller, body)
                }
            },
        )
        .untuple_one()
}

async fn read_json<S, B>(
    headers: &http::HeaderMap,
    body: S,
    limit: u64,
    timeout: Duration,
) -> Result<serde_json::Value, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    require_json_content_type(headers)?;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > limit) {
        return Err(too_large(limit));
    }
    let buf = tokio::time::timeout(timeout, read_limited(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                Reason::BodyTimeout,
                format!(
                    "the request body was not received within {}",
                    humantime::format_duration(timeout)
                ),
            )
        })??;
    super::strict_json::from_slice(&buf).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })
}

/// The body's media type must be `application/json` (parameters such as `charset` allowed).
fn require_json_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let value = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = value
        .as_deref()
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    let got = match value {
        Some(v) => format!("`{}`", v.chars().take(100).collect::<String>()),
        None => "none".into(),
    };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Reason::UnsupportedMediaType,
        format!("request bodies must be sent with `Content-Type: application/json` (got {got})"),
    ))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Reason::BodyTooLarge,
        format!("request body is larger than {limit} bytes"),
    )
}

async fn read_limited<S, B>(body: S, limit: u64) -> Result<Vec<u8>, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read body: {e}")))?;
        if buf.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf)
}

/// The route's outcome as a response (errors become their JSON body).
pub(crate) fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| e.into_response())
}

pub(crate) fn health(state: Arc<ApiState>) -> Response {
    let (running, slots) = state.engine.load();
    let status = if running >= slots {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    };
    json_reply(
        &HealthResponse {
            status,
            timestamp: rfc3339(Utc::now()),
            version: concat!("v", env!("CARGO_PKG_VERSION")),
            uptime: go_duration(state.started.elapsed()),
            jobs: JobLoad { running, slots },
        },
        StatusCode::OK,
    )
}

/// A duration as Go prints it, to whole seconds: `52s`, `14m52s`, `3h14m52s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

pub(crate) fn ready(state: Arc<ApiState>) -> Response {
    let deps = state.health.snapshot();
    let all_up = deps.values().all(|up| *up);
    let status = if all_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_reply(
        &ReadyResponse {
            status: if all_up { "ready" } else { "unready" },
            dependencies: deps,
        },
        status,
    )
}

/// `GET /api/v1/openapi.json`: the document of this daemon (with the empty security
/// requirement when it takes requests without credentials).
pub(crate) fn openapi(caller: Result<Caller, ApiError>, state: Arc<ApiState>) -> Response {
    if let Err(e) = caller {
        return e.into_response();
    }
    let open = state.auth.is_open();
    let mut resp = super::openapi::document_for(open).into_response();
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn metrics_text(caller: Result<Caller, ApiError>) -> Response {
    if let Err(e) = caller {
        return e.into_response();
    }
    let mut resp = metrics().render().into_response();
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The caller, checked first, then its JSON body parsed: a request without valid credentials
/// learns nothing of the body's rules.
pub(crate) fn caller_and_body<T: serde::de::DeserializeOwned>(
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
) -> Result<(Caller, T), ApiError> {
    let caller = caller?;
    Ok((caller, parse_body(body?)?))
}

pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: serde_json::Value,
) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::InvalidJson,
            "body must be a JSON object",
        ));
    }
    refuse_control_characters(&body, "")?;
    serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Refuses a body whose strings (keys or values, at any depth) hold control characters: no
/// field of the API needs one, and stored or echoed they would reach operators' terminals
/// (ESC sequences, OSC 52) and log lines.
fn refuse_control_characters(value: &serde_json::Value, at: &str) -> Result<(), ApiError> {
    let refuse = |field: &str| {
        let field = if field.is_empty() { "the body" } else { field };
        Err(ApiError::bad_request(format!(
            "{} holds a control character; no field accepts one",
            crate::text::escape(field)
        )))
    };
    match value {
        serde_json::Value::String(s) if crate::text::has_unsafe_chars(s) => refuse(at),
        serde_json::Value::Array(items) => items
            .iter()
            .try_for_each(|v| refuse_control_characters(v, at)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            if crate::text::has_unsafe_chars(k) {
                return refuse(k);
            }
            refuse_control_characters(v, k)
        }),
        _ => Ok(()),
    }
}

/// `image_url` as sent: present, not blank, at most `MAX_URL_LEN` characters (Unicode scalar
/// values, as JSON Schema's `maxLength` counts them, not bytes).
pub(crate) fn check_image_url_text(url: Option<String>) -> Result<String, ApiError> {
    let url = url
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("image_url is required"))?;
    let chars = url.chars().count();
    if chars > MAX_URL_LEN {
        return Err(ApiError::bad_request(format!(
            "image_url is longer than {MAX_URL_LEN} characters ({chars})"
        )));
    }
    Ok(url)
}

/// The fields of a job's body that name its image, as given.
struct ImageFields {
    image_url: Option<String>,
    image: Option<String>,
    checksum: Option<String>,
    checksum_url: Option<String>,
    image_type: Option<String>,
}

/// The `ImageFields` of a body that has them all (`ProvisionBody`, `CacheFetchBody`).
macro_rules! image_fields {
    ($body:expr) => {
        ImageFields {
            image_url: $body.image_url,
            image: $body.image,
            checksum: $body.checksum,
            checksum_url: $body.checksum_url,
            image_type: $body.image_type,
        }
    };
}

/// The image part of a job's spec (URL, declared name, checksum, manifest; nothing else set)
/// and the `image_type` given or declared, from a body's `ImageFields`.
fn image_spec(
    fields: ImageFields,
    state: &ApiState,
) -> Result<(JobSpec, Option<String>), ApiError> {
    let (image, name, image_type) = named_image(fields, state)?;
    let spec = JobSpec {
        image_url: image.image_url,
        image: name,
        checksum: image.checksum,
        checksum_url: image.checksum_url,
        ..JobSpec::default()
    };
    Ok((spec, image_type))
}

/// The image a job names and how it is checked: `image_url`, `checksum`, `checksum_url`.
struct ImageRequest {
    image_url: String,
    checksum: Option<String>,
    checksum_url: Option<String>,
}

/// The image a request names, checked: its `image_url`, or the declared `image` (exactly one
/// of the two; both or neither is 400), with the `checksum`/`checksum_url` and `image_type` of
/// the request, else of the declaration. Returns the image, the declared name, the type.
fn named_image(
    fields: ImageFields,
    state: &ApiState,
) -> Result<(ImageRequest, Option<String>, Option<String>), ApiError> {
    let ImageFields {
        image_url,
        image,
        checksum,
        checksum_url,
        image_type,
    } = fields;
    let name = match (image_url, image) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give image_url or image (a declared image's name), not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "image_url is required (or image: a declared image's name)",
            ));
        }
        (Some(url), None) => {
            let request = check_image_request(Some(url), checksum, checksum_url, state)?;
            return Ok((request, None, image_type));
        }
        (None, Some(name)) => name,
    };
    if !crate::config::valid_declared_name(&name) {
        return Err(ApiError::bad_request(
            "image must be a declared image's name ([A-Za-z0-9._-], 1..=64 characters, \
             starting with a letter or digit)",
        ));
    }
    let settings = state.settings.current();
    let decl = settings.declared_image(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::UnknownImage,
            format!("no image named `{name}` is declared (GET /api/v1/images lists them)"),
        )
    })?;
    let (checksum, checksum_url) = if checksum.is_some() || checksum_url.is_some() {
        (checksum, checksum_url)
    } else {
        (
            decl.checksum().map(str::to_string),
            decl.checksum_url().map(str::to_string),
        )
    };
    let request = check_image_request(Some(decl.url.clone()), checksum, checksum_url, state)?;
    let image_type = image_type.or_else(|| Some(decl.image_type.clone()));
    Ok((request, Some(name), image_type))
}

/// Checks the image, its checksum and manifest against the settings as a job will resolve
/// them (allow-lists, digest syntax, a host's signature requirement).
fn check_image_request(
    image_url: Option<String>,
    checksum: Option<String>,
    checksum_url: Option<String>,
    state: &ApiState,
) -> Result<ImageRequest, ApiError> {
    let image_url = check_image_url_text(image_url)?;
    let checksum_url = check_checksum_fields(&image_url, checksum.as_deref(), checksum_url)?;
    let request = SourceRequest {
        image_url: &image_url,
        checksum: checksum.as_deref(),
        checksum_url: checksum_url.as_deref(),
    };
    resolved::resolve(
        &state.sources,
        &request,
        &state.settings.current().source_policy(),
    )
    .map_err(|e| match e {
        RequestError::Invalid(e) => ApiError::bad_request(e.to_string()),
        RequestError::SignatureRequired(m) => {
            ApiError::new(StatusCode::BAD_REQUEST, Reason::SignatureRequired, m)
        }
    })?;
    Ok(ImageRequest {
        image_url,
        checksum,
        checksum_url,
    })
}

/// The checksum fields' own rules (400 when broken, for jobs and preflight alike): a
/// `checksum_url` is URL text, at most one of the two is given, a `checksum` parses.
pub(crate) fn check_checksum_fields(
    image_url: &str,
    checksum: Option<&str>,
    checksum_url: Option<String>,
) -> Result<Option<String>, ApiError> {
    let checksum_url = match checksum_url {
        None => None,
        Some(u) => Some(check_image_url_text(Some(u)).map_err(|_| {
            ApiError::bad_request(format!(
                "checksum_url must be a URL of at most {MAX_URL_LEN} characters"
            ))
        })?),
    };
    resolved::check_syntax(&SourceRequest {
        image_url,
        checksum,
        checksum_url: checksum_url.as_deref(),
    })
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(checksum_url)
}

/// The declared `image_type`: `qcow2` when none is named (provision jobs, preflight); `None`
/// for `auto` (the inspector decides).
pub(crate) fn check_image_type(t: Option<String>) -> Result<Option<ImageType>, ApiError> {
    match t {
        None => Ok(Some(ImageType::Qcow2)),
        Some(_) => check_declared_image_type(t),
    }
}

/// The declared `image_type`, if any (a cache fetch without one, or with `auto`, takes the
/// image as found).
fn check_declared_image_type(t: Option<String>) -> Result<Option<ImageType>, ApiError> {
    match t.as_deref() {
        None => Ok(None),
        Some(name) => ImageType::parse_declared(name).map_err(ApiError::bad_request),
    }
}

/// `correlation_id`: at most `MAX_CORRELATION_ID_LEN` characters (not bytes); empty is none.
fn check_correlation_id(c: Option<String>) -> Result<Option<String>, ApiError> {
    match c {
        None => Ok(None),
        Some(c) if c.is_empty() => Ok(None),
        Some(c) if c.chars().count() > MAX_CORRELATION_ID_LEN => {
            Err(ApiError::bad_request(format!(
                "correlation_id is longer than {MAX_CORRELATION_ID_LEN} characters ({})",
                c.chars().count()
            )))
        }
        Some(c) if c.chars().any(|ch| ch.is_control()) => Err(ApiError::bad_request(
            "correlation_id must not contain control characters",
        )),
        Some(c) => Ok(Some(c)),
    }
}

/// `volume_size_gb`: an integer 1..=`MAX_VOLUME_GB`. A number with a zero fraction (`50.0`)
/// is an integer, as JSON Schema counts them.
fn check_size(v: Option<serde_json::Value>) -> Result<u64, ApiError> {
    check_size_field("volume_size_gb", v)
}

/// A size in GiB named `field`: an integer 1..=`MAX_VOLUME_GB`.
pub(crate) fn check_size_field(field: &str, v: Option<serde_json::Value>) -> Result<u64, ApiError> {
    let v = v.ok_or_else(|| ApiError::bad_request(format!("{field} is required")))?;
    let integral = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    match integral {
        Some(n) if (1..=MAX_VOLUME_GB).contains(&n) => Ok(n),
        Some(n) if n > MAX_VOLUME_GB => Err(ApiError::bad_request(format!(
            "{field} {n} is larger than {MAX_VOLUME_GB}"
        ))),
        _ => Err(ApiError::bad_request(format!(
            "{field} must be an integer >= 1 (GiB), got {v}"
        ))),
    }
}

pub(crate) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::VolumeBusy { .. } => ApiError::conflict(Reason::VolumeInUse, e.to_string()),
        SubmitError::VolumeUnusable(VolumeError::EncryptionRefused(_)) => {
            ApiError::conflict(Reason::EncryptionRefused, e.to_string())
        }
        SubmitError::VolumeUnusable(_) | SubmitError::Clone(_) => {
            ApiError::conflict(Reason::VolumeUnusable, e.to_string())
        }
        SubmitError::QueueFull(_) => ApiError::too_many(Reason::QueueFull, e.to_string(), 30),
        SubmitError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::ShuttingDown,
            e.to_string(),
        ),
        SubmitError::KeyReused(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::IdempotencyKeyReused,
            e.to_string(),
        ),
        SubmitError::KeyInFlight => ApiError {
            retry_after: Some(1),
            ..ApiError::conflict(Reason::IdempotencyKeyInFlight, e.to_string())
        },
        SubmitError::Store(_) | SubmitError::Task(_) => ApiError::internal(e.to_string()),
    }
}

/// Submits a job of `kind` for `spec` on behalf of `caller`, under the request's
/// `Idempotency-Key` if it has one; a refused submission becomes the error `refused` makes.
pub(crate) async fn submit_spec(
    state: &ApiState,
    caller: &Caller,
    headers: &http::HeaderMap,
    (kind, spec): (JobKind, JobSpec),
    refused: fn(SubmitError) -> ApiError,
) -> Result<Submitted, ApiError> {
    let key = idempotency_key(headers, caller, kind, &spec)?;
    let origin = caller.origin();
    let submission = Submission {
        kind,
        spec,
        origin,
        key,
    };
    state.engine.submit(submission).await.map_err(refused)
}

/// 202 with the new job's id, or 200 with the job an `Idempotency-Key` already made (and
/// `Idempotent-Replayed: true`); both with the job's `Location`. The job's state is named as
/// the route names states (`names`).
pub(crate) fn accepted(submitted: &Submitted, names: StateNames) -> Response {
    let (job, status, replayed) = match submitted {
        Submitted::New(job) => (job, StatusCode::ACCEPTED, false),
        Submitted::Existing(job) => (job, StatusCode::OK, true),
    };
    let mut resp = json_reply(
        &Accepted {
            job_id: job.id,
            status: names.show(job.status),
        },
        status,
    );
    if let Ok(v) = format!("/api/v1/jobs/{}", job.id).parse() {
        resp.headers_mut().insert("location", v);
    }
    if replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        );
    }
    resp
}

/// The `Idempotency-Key` header, checked, scoped to the caller and the request.
fn idempotency_key(
    headers: &http::HeaderMap,
    caller: &Caller,
    kind: JobKind,
    spec: &JobSpec,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "Idempotency-Key is sent more than once; send one key per request",
        ));
    }
    let key = raw
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII characters"))?;
    idempotency::validate_key(key).map_err(ApiError::bad_request)?;
    Ok(Some(IdempotencyKey::new(
        key,
        caller.identity(),
        kind,
        spec,
    )))
}

pub(crate) async fn submit(
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    headers: http::HeaderMap,
    state: Arc<ApiState>,
    names: StateNames,
) -> Result<Response, ApiError> {
    let (caller, body): (Caller, ProvisionBody) = caller_and_body(caller, body)?;
    let (image, image_type) = image_spec(image_fields!(body), &state)?;
    let volume_name = body
        .volume_name
        .ok_or_else(|| ApiError::bad_request("volume_name is required"))?;
    volume::validate_volume_name(&volume_name)
        .and_then(|_| state.volumes.validate_name(&volume_name))
        .map_err(ApiError::bad_request)?;
    let size = check_size(body.volume_size_gb)?;
    let spec = JobSpec {
        image_type: check_image_type(image_type)?,
        correlation_id: check_correlation_id(body.correlation_id)?,
        volume_name: Some(volume_name),
        volume_size_gb: Some(size),
        encryption: body.encryption.map(|e| e.check()).transpose()?,
        ..image
    };
    let job = (JobKind::Provision, spec);
    let submitted = submit_spec(&state, &caller, &headers, job, submit_error).await?;
    let Submitted::New(job) = &submitted else {
        return Ok(accepted(&submitted, names));
    };
    tracing::info!(
        job_id = %job.id,
        correlation_id = job.spec.correlation_id.as_deref().unwrap_or(""),
        image_url = %job.spec.image_url,
        volume_name = job.spec.volume_name.as_deref().unwrap_or(""),
        requested_by = caller.identity().unwrap_or(""),
        "provision job accepted"
    );
    Ok(accepted(&submitted, names))
}

pub(crate) async fn cache_fetch(
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    headers: http::HeaderMap,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let (caller, body): (Caller, CacheFetchBody) = caller_and_body(caller, body)?;
    let (image, image_type) = image_spec(image_fields!(body), &state)?;
    let spec = JobSpec {
        image_type: check_declared_image_type(image_type)?,
        correlation_id: check_correlation_id(body.correlation_id)?,
        ..image
    };
    let job = (JobKind::CacheFetch, spec);
    let submitted = submit_spec(&state, &caller, &headers, job, submit_error).await?;
    if let Submitted::New(job) = &submitted {
        tracing::info!(job_id = %job.id, image_url = %job.spec.image_url, "cache fetch job accepted");
    }
    Ok(accepted(&submitted, StateNames::Ours))
}

/// A list request, once its caller was checked: the query parameters and `limit` (1..=1000,
/// default 100).
pub(crate) struct Listing {
    pub(crate) params: HashMap<String, String>,
    pub(crate) limit: usize,
}

impl Listing {
    pub(crate) fn parse(
        caller: Result<Caller, ApiError>,
        raw_query: &str,
    ) -> Result<Listing, ApiError> {
        caller?;
        let params = parse_query(raw_query);
        let limit = parse_limit(&params, 100)?;
        Ok(Listing { params, limit })
    }
}

fn parse_query(raw: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

fn parse_limit(q: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "limit must be an integer between 1 and {MAX_LIST_LIMIT}"
            ))),
        },
    }
}

/// `offset`: an integer 0..=2^63-1 (the document's `int64`); past the end is an empty page.
fn parse_offset(v: &str) -> Result<usize, ApiError> {
    v.parse::<i64>()
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "offset must be an integer between 0 and {}",
                i64::MAX
            ))
        })
}

pub(crate) async fn list(
    listing: Result<Listing, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let Listing { params: q, limit } = listing?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status `{s}` is not one of pending, running, completed, failed, cancelled"
            ))
        })?),
    };
    let (jobs, _total) = state
        .engine
        .store()
        .list_jobs(status, limit)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let jobs: Vec<_> = jobs
        .iter()
        .map(|j| StatusResponse::from_job(j, state.engine.queue_position(j.id)))
        .collect();
    Ok(json_reply(
        &JobList {
            count: jobs.len(),
            jobs,
        },
        StatusCode::OK,
    ))
}

/// A job id from the path (400 when malformed, not 404).
/// The volume name of a path segment: percent-decoded, then checked by the contract's rules
/// and the backend's.
pub(crate) fn volume_name_in_path(raw: &str, state: &ApiState) -> Result<String, ApiError> {
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("volume name is not UTF-8 once decoded"))?
        .into_owned();
    volume::validate_volume_name(&name)
        .and_then(|_| state.volumes.validate_name(&name))
        .map_err(ApiError::bad_request)?;
    Ok(name)
}

pub(crate) fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request(format!("`{raw}` is not a job id (UUID)")))
}

/// `GET /api/v1/jobs/{id}` and the Go service's `GET /api/v1/status/{id}` (`names`: which
/// names of the states the route shows).
pub(crate) async fn status(
    raw_id: String,
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
    names: StateNames,
) -> Result<Response, ApiError> {
    caller?;
    let id = parse_job_id(&raw_id)?;
    let job = state
        .engine
        .store()
        .get_job(id)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(Reason::JobNotFound, format!("job {id} not found")))?;
    Ok(json_reply(
        &StatusResponse::from_job(&job, state.engine.queue_position(id)).named(names),
        StatusCode::OK,
    ))
}

/// `POST /api/v1/jobs/{id}/cancel` and the Go service's `DELETE /api/v1/cancel/{id}`.
pub(crate) async fn cancel(
    raw_id: String,
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
    names: StateNames,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let id = parse_job_id(&raw_id)?;
    match state.engine.cancel(id, CANCEL_WAIT).await {
        Ok(job) => {
            tracing::info!(job_id = %id, requested_by = caller.identity().unwrap_or(""), "job cancel requested");
            let status = if job.status == JobStatus::Running {
                "cancelling"
            } else {
                "cancelled"
            };
            Ok(json_reply(
                &CancelResponse { status, job_id: id },
                StatusCode::OK,
            ))
        }
        Err(CancelError::NotFound(_)) => Err(ApiError::not_found(
            Reason::JobNotFound,
            format!("job {id} not found"),
        )),
        Err(CancelError::Terminal(status)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::JobTerminal,
            CancelError::Terminal(names.show(status)).to_string(),
        )),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

pub(crate) async fn cache_list(
    listing: Result<Listing, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let Listing { params: q, limit } = listing?;
    let offset = match q.get("offset") {
        None => 0,
        Some(v) => parse_offset(v)?,
    };
    let cache = &state.cache;
    let entries = cache.entries();
    let total = entries.len();
    let images: Vec<_> = entries
        .iter()
        .rev()
        .skip(offset)
        .take(limit)
        .map(|e| CacheImage {
            key: e.key.clone(),
            path: cache.dir().join(format!("{}.img", e.key)),
            size: e.size,
            checksum: e.sha256.clone(),
            compression: e.compression,
            content_sha256: e.content_sha256.clone(),
            checksum_verified: e.verified,
            verified: e.verification.clone(),
            image_url: e.image_url.clone(),
            format: e.inspection.format,
            virtual_size: e.inspection.virtual_size,
            last_used: rfc3339(e.last_used),
            mod_time: rfc3339(e.created),
            in_use: cache.in_use_count(&e.key),
        })
        .collect();
    Ok(json_reply(
        &CacheList {
            images,
            count: total,
            offset,
            limit,
        },
        StatusCode::OK,
    ))
}

/// A cache key: 64 lowercase hex digits (the SHA-256 of what names the image).
pub(crate) fn is_cache_key(key: &str) -> bool {
    key.len() == 64
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) async fn cache_delete(
    key: String,
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    if !is_cache_key(&key) {
        return Err(ApiError::bad_request(
            "cache key must be 64 lowercase hex digits",
        ));
    }
    let cache = &state.cache;
    match cache.remove(&key) {
        Ok(_) => {
            tracing::info!(
                key,
                requested_by = caller.identity().unwrap_or(""),
                "cache entry deleted"
            );
            Ok(json_reply(
                &CacheDeleted {
                    status: "deleted",
                    key,
                },
                StatusCode::OK,
            ))
        }
        Err(crate::image::cache::RemoveError::InUse(n)) => Err(ApiError::conflict(
            Reason::CacheEntryInUse,
            format!("cache entry {key} is in use by {n} job(s)"),
        )),
        Err(crate::image::cache::RemoveError::NotFound) => Err(ApiError::not_found(
            Reason::CacheEntryNotFound,
            format!("cache entry {key} not found"),
        )),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

pub(crate) async fn volume_delete(
    name: String,
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let name = volume_name_in_path(&name, &state)?;
    let span =
        tracing::info_span!("delete_volume", otel.name = "DeleteVolume", volume_name = %name);
    let deletion = state
        .engine
        .delete_volume(&name, caller.origin())
        .instrument(span)
        .await
        .map_err(|e| match e {
            DeleteError::Busy { .. } => ApiError::conflict(Reason::VolumeInUse, e.to_string()),
            DeleteError::Blocked { .. } | DeleteError::Volume(VolumeError::Conflict(_)) => {
                ApiError::conflict(Reason::VolumeBlocked, e.to_string())
            }
            DeleteError::Submit(e) => submit_error(e),
            DeleteError::Volume(_) | DeleteError::Task(_) => ApiError::internal(e.to_string()),
        })?;
    match deletion {
        Deletion::Done(existed) => {
            if existed {
                tracing::info!(volume = %name, requested_by = caller.identity().unwrap_or(""), "volume deleted");
            }
            Ok(json_reply(
                &VolumeDeleted {
                    status: "deleted",
                    volume: name,
                },
                StatusCode::OK,
            ))
        }
        Deletion::Queued(job) => {
            tracing::info!(volume = %name, job_id = %job.id, requested_by = caller.identity().unwrap_or(""), "volume wipe job accepted");
            Ok(accepted(&Submitted::New(*job), StateNames::Ours))
        }
    }
}

/// `GET /api/v1/config`: the effective configuration (secrets redacted), the last reload and
/// the changed keys that wait for a restart.
pub(crate) async fn config(
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    // The status first: a reload publishes its settings before (under the status lock) it
    // reports success, so the settings read next are at least as new as the status.
    let status = state.reloader.status();
    let settings = state.settings.current();
    let rendered = crate::config::redacted_toml(&settings);
    let effective: toml::Value =
        toml::from_str(&rendered).map_err(|e| ApiError::internal(e.to_string()))?;
    let effective =
        serde_json::to_value(effective).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_reply(
        &ConfigResponse {
            config: effective,
            last_reload: status.last_reload.map(rfc3339),
            last_reload_result: status.last_result,
            last_reload_error: status.last_error,
            pending_restart: status.pending_restart,
        },
        StatusCode::OK,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_style_uptime() {
        assert_eq!(go_duration(Duration::from_secs(52)), "52s");
        assert_eq!(go_duration(Duration::from_secs(14 * 60 + 52)), "14m52s");
        assert_eq!(
            go_duration(Duration::from_secs(3 * 3600 + 14 * 60 + 52)),
            "3h14m52s"
        );
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn sizes() {
        assert_eq!(check_size(Some(json!(50))).unwrap(), 50);
        // A zero fraction is an integer, as JSON Schema counts them.
        assert_eq!(check_size(Some(json!(50.0))).unwrap(), 50);
        assert_eq!(check_size(Some(json!(1048576.0))).unwrap(), MAX_VOLUME_GB);
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("50"),
            json!(null),
            json!(0.0),
            json!(-3.0),
            json!(1048577.0),
            json!(1e300),
        ] {
            assert!(check_size(Some(bad.clone())).is_err(), "{bad}");
        }
        assert!(check_size(None).is_err());
    }

    /// The limits count characters (Unicode scalar values), as the document's `maxLength`
    /// does and as the messages say, not bytes.
    #[test]
    fn length_limits_count_characters_not_bytes() {
        let wide = |n: usize| "é".repeat(n);
        assert_eq!(wide(256).len(), 512, "two bytes each");
        assert_eq!(
            check_correlation_id(Some(wide(256))).unwrap().unwrap(),
            wide(256)
        );
        let e = check_correlation_id(Some(wide(257))).unwrap_err();
        assert!(
            e.message.contains("longer than 256 characters (257)"),
            "{}",
            e.message
        );
        assert_eq!(check_correlation_id(Some(String::new())).unwrap(), None);
        let url = |n: usize| format!("s3://b/{}", wide(n - 7));
        assert_eq!(url(4096).chars().count(), 4096);
        assert_eq!(check_image_url_text(Some(url(4096))).unwrap(), url(4096));
        let e = check_image_url_text(Some(url(4097))).unwrap_err();
        assert!(
            e.message.contains("longer than 4096 characters (4097)"),
            "{}",
            e.message
        );
        for blank in ["", " ", "\t\u{3000}\u{a0}"] {
            assert!(
                check_image_url_text(Some(blank.into())).is_err(),
                "{blank:?}"
            );
        }
    }

    #[test]
    fn declared_image_types() {
        assert_eq!(check_declared_image_type(None).unwrap(), None);
        assert_eq!(
            check_declared_image_type(Some("raw".into())).unwrap(),
            Some(ImageType::Raw)
        );
        assert_eq!(check_image_type(None).unwrap(), Some(ImageType::Qcow2));
        assert_eq!(check_image_type(Some("auto".into())).unwrap(), None);
        assert_eq!(
            check_declared_image_type(Some("vmdk".into())).unwrap(),
            Some(ImageType::Vmdk)
        );
        assert!(check_declared_image_type(Some("ova".into())).is_err());
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("0").unwrap(), 0);
        assert_eq!(
            parse_offset("9223372036854775807").unwrap(),
            i64::MAX as usize
        );
        for bad in ["-1", "9223372036854775808", "1.5", "x", ""] {
            assert!(parse_offset(bad).is_err(), "{bad}");
        }
    }
}
