//! What each client subcommand sends and prints: text for people, the API's JSON body for
//! `--output json` (one JSON document on stdout, errors included), and the exit status.

use serde_json::{Value, json};

use super::args::{
    CacheCommand, ClientCommand, ClientOptions, ImageCommand, JobCommand, OutputFormat,
    ProvisionArgs, VolumeCommand, WaitArgs,
};
use super::exit;
use super::fleet;
use super::http::{Api, ClientError, ConnectKind};
use super::watch::{self, Display, EncryptionView, JobView, OnInterrupt, Outcome};
use indicatif::HumanBytes;

/// Runs `command`; returns the exit status.
pub(crate) async fn run(opts: &ClientOptions, command: ClientCommand) -> u8 {
    let json = opts.output == OutputFormat::Json;
    if let ClientCommand::Fleet(args) = command {
        return fleet::run(opts, args).await;
    }
    let result = match Api::new(opts) {
        Ok(api) => dispatch(&api, json, command).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(code) => code,
        Err(e) => report_error(&e, json),
    }
}

/// Prints an error (stderr; with `--output json` also the error body on stdout).
fn report_error(e: &ClientError, json: bool) -> u8 {
    eprintln!("error: {e}");
    let (code, body) = match e {
        ClientError::Refused { body, .. } => (exit::FAILED, body.clone()),
        ClientError::Protocol(_) => (
            exit::FAILED,
            json!({"error": "protocol", "message": e.to_string()}),
        ),
        ClientError::Setup(_) | ClientError::Connect { .. } => (
            exit::UNREACHABLE,
            json!({"error": "unreachable", "message": e.to_string()}),
        ),
    };
    if json {
        println!("{body}");
    }
    code
}

async fn dispatch(api: &Api, json: bool, command: ClientCommand) -> Result<u8, ClientError> {
    match command {
        ClientCommand::Provision(args) => provision(api, json, *args).await,
        ClientCommand::Job(JobCommand::Get { id }) => {
            let job = api.get(&format!("/api/v1/jobs/{}", path_part(&id))).await?;
            print_value(json, &job, describe_job);
            Ok(exit::OK)
        }
        ClientCommand::Job(JobCommand::List { status, limit }) => {
            let mut query = format!("?limit={limit}");
            if let Some(s) = status {
                query += &format!("&status={s}");
            }
            let list = api.get(&format!("/api/v1/jobs{query}")).await?;
            print_value(json, &list, job_table);
            Ok(exit::OK)
        }
        ClientCommand::Job(JobCommand::Watch {
            id,
            cancel_on_interrupt,
        }) => wait_for(api, json, &path_part(&id), cancel_on_interrupt).await,
        ClientCommand::Job(JobCommand::Cancel { id }) => {
            let (_, body) = api
                .post(
                    &format!("/api/v1/jobs/{}/cancel", path_part(&id)),
                    &json!({}),
                    None,
                )
                .await?;
            print_value(json, &body, |b| {
                format!(
                    "job {}: {}",
                    field(&b["job_id"], &id),
                    field(&b["status"], "?")
                )
            });
            Ok(exit::OK)
        }
        ClientCommand::Cache(c) => cache(api, json, c).await,
        ClientCommand::Volume(v) => volume(api, json, v).await,
        ClientCommand::Image(ImageCommand::List) => {
            let list = api.get("/api/v1/images").await?;
            print_value(json, &list, declared_table);
            Ok(exit::OK)
        }
        ClientCommand::Image(ImageCommand::Inspect {
            image_url,
            image_type,
        }) => inspect(api, json, image_url, image_type).await,
        // `run` hands fleet commands to `fleet::run` before one server's Api is built.
        ClientCommand::Fleet(_) => Err(ClientError::Setup(
            "fleet commands run on every host of --hosts, not on --server".into(),
        )),
        ClientCommand::Health => {
            let body = api.get("/health").await?;
            print_value(json, &body, |b| {
                format!(
                    "{} {} (up {}, jobs {}/{} running)",
                    field(&b["status"], "?"),
                    field(&b["version"], "?"),
                    field(&b["uptime"], "?"),
                    b["jobs"]["running"],
                    b["jobs"]["slots"]
                )
            });
            Ok(exit::OK)
        }
    }
}

/// `volume ...`: delete (maybe through a wipe job), grow, upload.
async fn volume(api: &Api, json: bool, command: VolumeCommand) -> Result<u8, ClientError> {
    match command {
        VolumeCommand::Delete { name } => {
            let body = api
                .delete(&format!("/api/v1/volumes/{}", path_part(&name)))
                .await?;
            print_value(json, &body, |b| match b["job_id"].as_str() {
                Some(id) => format!(
                    "volume {name}: wiped and removed by job {id} (follow it: job watch {id})"
                ),
                None => format!("volume {} deleted", field(&b["volume"], &name)),
            });
            Ok(exit::OK)
        }
        VolumeCommand::Resize { name, size_gb } => {
            let (_, body) = api
                .post(
                    &format!("/api/v1/volumes/{}/resize", path_part(&name)),
                    &json!({ "size_gb": size_gb }),
                    None,
                )
                .await?;
            print_value(json, &body, |b| {
                let live = match b["domain"].as_str() {
                    Some(d) => format!(" (running domain {} told)", crate::text::escape(d)),
                    None => String::new(),
                };
                format!(
                    "volume {}: {} bytes{live}",
                    field(&b["volume"], &name),
                    b["size_bytes"]
                )
            });
            Ok(exit::OK)
        }
        VolumeCommand::Upload { name, file } => upload(api, json, &name, &file).await,
        VolumeCommand::Clone {
            name,
            target,
            size_gb,
            allow_in_use,
            idempotency_key: key,
            encrypt,
            wait,
        } => {
            let mut body = json!({ "target": target });
            if let Some(encryption) = encrypt.body() {
                body["encryption"] = encryption;
            }
            if let Some(gb) = size_gb {
                body["size_gb"] = json!(gb);
            }
            if allow_in_use {
                body["allow_in_use"] = json!(true);
            }
            let path = format!("/api/v1/volumes/{}/clone", path_part(&name));
            submit(api, json, &path, &body, &idempotency_key(key), wait).await
        }
    }
}

/// Characters a path segment keeps as they are (RFC 3986 unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment, percent-encoded (volume names and ids come from the user).
fn path_part(raw: &str) -> String {
    percent_encoding::utf8_percent_encode(raw, SEGMENT).to_string()
}

/// A string field of a server answer as it may be printed on a terminal (control characters
/// as visible escapes; `--output json` prints the answer as it came instead).
fn field(value: &Value, missing: &str) -> String {
    crate::text::escape(value.as_str().unwrap_or(missing)).into_owned()
}

fn print_value(json: bool, value: &Value, text: impl Fn(&Value) -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text(value));
    }
}

/// A new random Idempotency-Key unless one was given.
fn idempotency_key(given: Option<String>) -> String {
    given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn provision(api: &Api, json: bool, args: ProvisionArgs) -> Result<u8, ClientError> {
    let mut body = json!({
        "volume_name": args.volume,
        "volume_size_gb": args.size_gb,
    });
    match (args.image_url, args.image) {
        (Some(url), _) => body["image_url"] = json!(url),
        (None, Some(name)) => body["image"] = json!(name),
        (None, None) => {}
    }
    if let Some(t) = args.image_type {
        body["image_type"] = json!(t);
    }
    if let Some(c) = args.correlation_id {
        body["correlation_id"] = json!(c);
    }
    if let Some(c) = args.checksum {
        body["checksum"] = json!(c);
    }
    if let Some(u) = args.checksum_url {
        body["checksum_url"] = json!(u);
    }
    if let Some(encryption) = args.encrypt.body() {
        body["encryption"] = encryption;
    }
    let key = idempotency_key(args.idempotency_key);
    submit(api, json, "/api/v1/jobs", &body, &key, args.wait).await
}

/// POSTs a job; with `--wait`, follows it. A request that failed on the way (not refused)
/// is sent again with the same Idempotency-Key, which cannot make a second job.
async fn submit(
    api: &Api,
    json: bool,
    path: &str,
    body: &Value,
    key: &str,
    wait: WaitArgs,
) -> Result<u8, ClientError> {
    let mut attempt = 0;
    let (_, accepted) = loop {
        match api.post(path, body, Some(key)).await {
            Err(ClientError::Connect { kind, message })
                if attempt < 2 && kind != ConnectKind::Refused =>
            {
                attempt += 1;
                eprintln!("retrying ({message})");
                tokio::time::sleep(std::time::Duration::from_secs(attempt)).await;
            }
            other => break other?,
        }
    };
    let id = accepted["job_id"]
        .as_str()
        .and_then(|id| uuid::Uuid::parse_str(id).ok())
        .ok_or_else(|| ClientError::Protocol("no job id (a UUID) in the answer".into()))?
        .to_string();
    if !wait.wait {
        print_value(json, &accepted, |b| {
            format!("job {id} accepted ({})", field(&b["status"], "?"))
        });
        return Ok(exit::OK);
    }
    if !json {
        println!("job {id} accepted; following it (Ctrl-C to stop)");
    }
    wait_for(api, json, &id, wait.cancel_on_interrupt).await
}

/// Follows a job to its end and turns its final state into the exit status.
async fn wait_for(api: &Api, json: bool, id: &str, cancel: bool) -> Result<u8, ClientError> {
    let display = Display::choose(json);
    let on_interrupt = if cancel {
        OnInterrupt::Cancel
    } else {
        OnInterrupt::Ask
    };
    let outcome = watch::follow(api, id, display, on_interrupt).await?;
    let Outcome::Finished(last) = outcome else {
        eprintln!("stopped following job {id}; it goes on (`job watch {id}` follows it again)");
        return Ok(exit::INTERRUPTED);
    };
    let job: JobView = serde_json::from_value(last.clone())
        .map_err(|e| ClientError::Protocol(format!("job status: {e}")))?;
    if json {
        println!("{last}");
    }
    Ok(match job.status.as_str() {
        "completed" => {
            if !json {
                println!("{}", completed_line(&job));
            }
            exit::OK
        }
        status => {
            eprintln!(
                "job {} {status}: {}",
                job.job_id,
                job.error.as_deref().unwrap_or("no reason given")
            );
            if status == "cancelled" {
                exit::CANCELLED
            } else {
                exit::FAILED
            }
        }
    })
}

fn completed_line(job: &JobView) -> String {
    let what = match (&job.volume_path, &job.image_path) {
        (Some(v), _) => format!("volume {v}"),
        (None, Some(i)) => format!("image cached at {i}"),
        _ => "done".into(),
    };
    let hit = if job.cache_hit { " (cache hit)" } else { "" };
    let encrypted = job
        .encryption
        .as_ref()
        .map(|e| format!("; {}", e.describe()))
        .unwrap_or_default();
    format!("job {} completed: {what}{hit}{encrypted}", job.job_id)
}

fn describe_job(j: &Value) -> String {
    let p = &j["progress"];
    let mut lines = vec![
        format!("job:        {}", field(&j["job_id"], "?")),
        format!("kind:       {}", field(&j["kind"], "?")),
        format!("status:     {}", field(&j["status"], "?")),
        format!(
            "progress:   {} {}% ({} of {} bytes)",
            field(&p["stage"], "?"),
            p["percent"],
            p["bytes_processed"],
            p["bytes_total"]
        ),
        format!("image:      {}", field(&j["image_url"], "?")),
    ];
    for (label, key) in [
        ("declared:   ", "image"),
        ("digest:     ", "image_digest"),
        ("volume:     ", "volume_name"),
        ("path:       ", "volume_path"),
        ("error:      ", "error"),
        ("reason:     ", "reason"),
        ("correlation:", "correlation_id"),
        ("created:    ", "created_at"),
        ("finished:   ", "finished_at"),
    ] {
        if let Some(v) = j[key].as_str() {
            lines.push(format!("{label} {}", crate::text::escape(v)));
        }
    }
    if let Ok(e) = serde_json::from_value::<EncryptionView>(j["encryption"].clone()) {
        lines.push(format!("encryption:  {}", e.describe()));
    }
    if let Some(d) = j["verified"]["digest"].as_str() {
        let by = j["verified"]["signed_by"]
            .as_str()
            .map(|f| format!(", signed by {f}"))
            .unwrap_or_default();
        lines.push(format!(
            "verified:    {}{}",
            crate::text::escape(d),
            crate::text::escape(&by)
        ));
    }
    lines.join("\n")
}

fn job_table(list: &Value) -> String {
    let mut out = format!(
        "{:<36}  {:<9}  {:<11}  {:<12}  {:>6}  {}",
        "JOB", "STATUS", "KIND", "STAGE", "PCT", "VOLUME"
    );
    for j in list["jobs"].as_array().into_iter().flatten() {
        out += &format!(
            "\n{:<36}  {:<9}  {:<11}  {:<12}  {:>5.1}%  {}",
            field(&j["job_id"], "?"),
            field(&j["status"], "?"),
            field(&j["kind"], "?"),
            field(&j["progress"]["stage"], "?"),
            j["progress"]["percent"].as_f64().unwrap_or(0.0),
            field(&j["volume_name"], "-"),
        );
    }
    out
}

async fn cache(api: &Api, json: bool, command: CacheCommand) -> Result<u8, ClientError> {
    match command {
        CacheCommand::List { offset, limit } => {
            let list = api
                .get(&format!(
                    "/api/v1/cache/images?offset={offset}&limit={limit}"
                ))
                .await?;
            print_value(json, &list, cache_table);
            Ok(exit::OK)
        }
        CacheCommand::Fetch {
            image_url,
            image_type,
            idempotency_key: key,
            wait,
        } => {
            // A URL has a scheme; anything else names a declared image.
            let mut body = if image_url.contains("://") {
                json!({"image_url": image_url})
            } else {
                json!({"image": image_url})
            };
            if let Some(t) = image_type {
                body["image_type"] = json!(t);
            }
            let key = idempotency_key(key);
            submit(api, json, "/api/v1/cache/fetch", &body, &key, wait).await
        }
        CacheCommand::Delete { key } => {
            let body = api
                .delete(&format!("/api/v1/cache/images/{}", path_part(&key)))
                .await?;
            print_value(json, &body, |b| {
                format!("cache entry {} deleted", field(&b["key"], &key))
            });
            Ok(exit::OK)
        }
    }
}

fn declared_table(list: &Value) -> String {
    let mut out = format!(
        "{:<24}  {:<6}  {:<6}  {:<71}  {:<25}  {:<25}  ERROR",
        "NAME", "CACHED", "GOLDEN", "DIGEST", "LAST CHECKED", "NEXT CHECK"
    );
    let yes_no = |v: &Value| {
        if v.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    for i in list["images"].as_array().into_iter().flatten() {
        out += &format!(
            "\n{:<24}  {:<6}  {:<6}  {:<71}  {:<25}  {:<25}  {}",
            field(&i["name"], "?"),
            yes_no(&i["cached"]),
            yes_no(&i["golden"]),
            field(&i["digest"], "-"),
            field(&i["last_checked"], "-"),
            field(&i["next_check"], "-"),
            field(&i["last_error"], "-"),
        );
    }
    out
}

fn cache_table(list: &Value) -> String {
    let mut out = format!(
        "{:<64}  {:>10}  {:<6}  {:>10}  {:<24}  {}",
        "KEY", "SIZE", "FORMAT", "VIRTUAL", "LAST USED", "URL"
    );
    for e in list["images"].as_array().into_iter().flatten() {
        out += &format!(
            "\n{:<64}  {:>10}  {:<6}  {:>10}  {:<24}  {}",
            field(&e["key"], "?"),
            HumanBytes(e["size"].as_u64().unwrap_or(0)).to_string(),
            field(&e["format"], "?"),
            HumanBytes(e["virtual_size"].as_u64().unwrap_or(0)).to_string(),
            field(&e["last_used"], "?"),
            field(&e["image_url"], "?"),
        );
    }
    out += &format!("\n{} entries", list["count"]);
    out
}

async fn inspect(
    api: &Api,
    json: bool,
    image_url: String,
    image_type: Option<String>,
) -> Result<u8, ClientError> {
    let mut body = json!({"image_url": image_url});
    if let Some(t) = image_type {
        body["image_type"] = json!(t);
    }
    let (_, answer) = api.post("/api/v1/images/inspect", &body, None).await?;
    let accepted = answer["accepted"].as_bool().unwrap_or(false);
    print_value(json, &answer, |a| {
        let mut lines = vec![
            format!("image:        {}", field(&a["image_url"], "?")),
            format!("format:       {}", field(&a["format"], "unknown")),
        ];
        if a["subformat"].is_string() {
            lines.push(format!("subformat:    {}", field(&a["subformat"], "")));
        }
        if a["container"].is_string() {
            lines.push(format!("inside:       {}", field(&a["container"], "")));
        }
        if let Some(v) = a["virtual_size"].as_u64() {
            lines.push(format!("virtual size: {} ({v} bytes)", HumanBytes(v)));
        }
        if let Some(v) = a["size"].as_u64() {
            lines.push(format!("size on disk: {} ({v} bytes)", HumanBytes(v)));
        }
        lines.push(format!("cache:        {}", field(&a["cache"], "?")));
        for (i, check) in a["checks"].as_array().into_iter().flatten().enumerate() {
            let label = if i == 0 { "checks:" } else { "" };
            lines.push(format!("{label:<14}{}", field(check, "?")));
        }
        lines.push(if accepted {
            "accepted:     yes".to_string()
        } else {
            format!(
                "accepted:     no: {}",
                field(&a["reason"], "no reason given")
            )
        });
        lines.join("\n")
    });
    if !accepted && !json {
        eprintln!(
            "error: the daemon would refuse this image: {}",
            field(&answer["reason"], "no reason given")
        );
    }
    Ok(if accepted { exit::OK } else { exit::FAILED })
}

async fn upload(
    api: &Api,
    json: bool,
    name: &str,
    file: &std::path::Path,
) -> Result<u8, ClientError> {
    use sha2::{Digest, Sha256};
    let bytes = tokio::fs::read(file)
        .await
        .map_err(|e| ClientError::Setup(format!("cannot read {}: {e}", file.display())))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let len = bytes.len();
    let req = api
        .request(
            reqwest::Method::PUT,
            &format!("/api/v1/volumes/{}/content", path_part(name)),
        )
        .header("content-type", "application/octet-stream")
        .header("x-content-sha256", &digest)
        .body(bytes);
    let (_, body) = api.send(req).await?;
    print_value(json, &body, |b| {
        format!(
            "uploaded {} ({len} bytes, sha256 {digest}) into volume {}",
            file.display(),
            field(&b["volume_path"], name)
        )
    });
    Ok(exit::OK)
}
