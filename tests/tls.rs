//! mTLS and API tokens against the real binary over real TLS: a test PKI made with rcgen (CA,
//! server, two clients, a foreign CA's client, an expired client), reqwest (rustls) and curl
//! as clients, raw sockets for the slow-client limits, and the start-up refusals of insecure
//! or broken configurations.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN_CI: &str = "ci-0123456789abcdef0123456789abcdef";
const TOKEN_ANON: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg";
const TOKEN_WRONG: &str = "ci-0123456789abcdef0123456789abcdeX";

/// The test PKI in `root/pki`: the server, clients `orchestrator` (with a DNS name) and
/// `intruder`, and, each with the common name `orchestrator`, a client of another CA (`foreign`)
/// and an expired one (`expired`).
fn tls_pki(root: &Path) -> Pki {
    let pki = Pki::create(&root.join("pki"), &["intruder"]);
    pki.issue_client(
        "orchestrator",
        ClientCert::cn("orchestrator").san("orchestrator.example.com"),
    );
    pki.issue_client("foreign", ClientCert::cn("orchestrator").other_ca());
    pki.issue_client("expired", ClientCert::cn("orchestrator").expired());
    pki
}

/// A small qcow2 under the daemon's file root and a provision request for it.
fn provision_body(dir: &Path, volume: &str) -> Value {
    let image = dir.join("images/small.qcow2");
    if !image.exists() {
        make_qcow2(&image, "16M");
    }
    json!({"image_url": file_url(&image), "volume_name": volume, "volume_size_gb": 1})
}

async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Value), reqwest::Error> {
    let r = req.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// The value of `libvirt_volume_provisioner_auth_failures_total{reason}` in a metrics text.
fn auth_failures(metrics_text: &str, reason: &str) -> u64 {
    let needle = format!("libvirt_volume_provisioner_auth_failures_total{{reason=\"{reason}\"}} ");
    metrics_text
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

fn assert_no_secret_in_log(d: &Daemon) {
    let log = d.log();
    for secret in [TOKEN_CI, TOKEN_ANON, TOKEN_WRONG, "ci-0123456789abcdef"] {
        assert!(!log.contains(secret), "a token appears in the log:\n{log}");
    }
}

/// Asserts an error body of the API contract.
fn assert_error_body(v: &Value, code: u16, error: &str) {
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["error"], error, "{v}");
    assert!(v["message"].is_string(), "{v}");
}

fn curl_available() -> bool {
    Command::new("curl").arg("--version").output().is_ok()
}

/// Runs curl, returning (exit code, HTTP status or 0, body).
fn curl(args: &[&str]) -> (i32, u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

#[tokio::test]
async fn mtls_required_checks_certificates_and_allowed_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = tls_pki(dir);
    let config = pki
        .server_tls(TestConfig::new(dir), Some("required"))
        .set("auth.allowed_clients", vec!["orchestrator"]);
    let d = Daemon::start_https(dir, &config, &[]);
    let body = provision_body(dir, "vm-mtls");

    // No certificate: the handshake fails, no HTTP status at all.
    let err = send(
        pki.anonymous_client()
            .post(d.url("/api/v1/jobs"))
            .json(&body),
    )
    .await
    .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    let err = send(pki.anonymous_client().get(d.url("/health")))
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    // A certificate of another CA, and an expired one of ours: refused in the handshake.
    for who in ["foreign", "expired"] {
        let r = send(pki.client(who).post(d.url("/api/v1/jobs")).json(&body)).await;
        assert!(r.is_err(), "{who}: {r:?}");
    }

    // Valid certificate, not in allowed_clients: 403.
    let intruder = pki.client("intruder");
    let (status, v) = send(intruder.post(d.url("/api/v1/jobs")).json(&body))
        .await
        .unwrap();
    assert_eq!(status, 403, "{v}");
    assert_error_body(&v, 403, "forbidden");
    assert!(v["message"].as_str().unwrap().contains("intruder"), "{v}");
    // Open routes stay open for it.
    let (status, _) = send(intruder.get(d.url("/health"))).await.unwrap();
    assert_eq!(status, 200);

    // Valid, allowed certificate: 202 over HTTP/2, and the job records who asked.
    let c = pki.client("orchestrator");
    let r = c
        .post(d.url("/api/v1/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let id = accepted_job(r).await;
    let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["requested_by"], "orchestrator", "{job}");

    // Oversized JSON body: 413 (declared length and chunked).
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let (status, v) = send(
        c.post(d.url("/api/v1/jobs"))
            .header("content-type", "application/json")
            .body(big.clone()),
    )
    .await
    .unwrap();
    assert_eq!(status, 413, "{v}");
    assert_error_body(&v, 413, "payload too large");
    let chunks = futures::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let (status, _) = send(
        c.post(d.url("/api/v1/jobs"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await
    .unwrap();
    assert_eq!(status, 413);

    // Plain HTTP to the TLS port: a clear 400, and the daemon carries on.
    let plain = client();
    let (status, v) = get(&plain, &d.url("/health").replacen("https://", "http://", 1)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["message"], "this port serves HTTPS; use https://");

    // curl (OpenSSL) as a second, independent client.
    if curl_available() {
        let ca = pki.file("ca.crt");
        let (cert, key) = (pki.file("orchestrator.crt"), pki.file("orchestrator.key"));
        let (rc, status, body) = curl(&[
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            &d.url(&format!("/api/v1/jobs/{id}")),
        ]);
        assert_eq!((rc, status), (0, 200), "{body}");
        assert!(body.contains("\"requested_by\":\"orchestrator\""), "{body}");
        let (rc, status, _) = curl(&["--cacert", &ca, &d.url("/health")]);
        assert_ne!(rc, 0, "curl without a certificate must fail");
        assert_eq!(status, 0);
        let (fc, fk) = (pki.file("foreign.crt"), pki.file("foreign.key"));
        let (rc, _, _) = curl(&[
            "--cacert",
            &ca,
            "--cert",
            &fc,
            "--key",
            &fk,
            &d.url("/health"),
        ]);
        assert_ne!(rc, 0, "curl with a foreign certificate must fail");
        let (ic, ik) = (pki.file("intruder.crt"), pki.file("intruder.key"));
        let (rc, status, _) = curl(&[
            "--cacert",
            &ca,
            "--cert",
            &ic,
            "--key",
            &ik,
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
            &d.url("/api/v1/jobs"),
        ]);
        assert_eq!((rc, status), (0, 403));
    }

    // The refusals are counted by reason and logged with the identity.
    let (status, text) = get(&c, &d.url("/metrics")).await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    assert!(auth_failures(&text, "no_client_certificate") >= 2, "{text}");
    assert!(
        auth_failures(&text, "invalid_client_certificate") >= 2,
        "{text}"
    );
    assert!(auth_failures(&text, "client_not_allowed") >= 1, "{text}");
    let log = d.log();
    assert!(log.contains("\"message\":\"listening (TLS)\""), "{log}");
    assert!(log.contains("\"client_auth\":\"required\""), "{log}");
    assert!(log.contains("\"identity\":\"orchestrator\""), "{log}");
    assert!(log.contains("\"reason\":\"client_not_allowed\""), "{log}");
    assert!(
        log.contains("\"reason\":\"invalid_client_certificate\""),
        "{log}"
    );
    assert_no_secret_in_log(&d);
}

#[tokio::test]
async fn optional_client_certificates_and_api_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = tls_pki(dir);
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("# API tokens\n\nci-runner:{TOKEN_CI}\n{TOKEN_ANON}\n"),
    )
    .unwrap();
    let config = pki
        .server_tls(TestConfig::new(dir), Some("optional"))
        .set("auth.allowed_clients", vec!["orchestrator.example.com"])
        .set("auth.tokens_file", tokens.display().to_string())
        .set("auth.protect_metrics", true);
    let d = Daemon::start_https(dir, &config, &[]);
    let anon = pki.anonymous_client();
    let jobs = d.url("/api/v1/jobs");

    // Nothing presented: 401 without credentials in the body; open routes stay open.
    let r = anon.get(&jobs).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let v: Value = r.json().await.unwrap();
    assert_error_body(&v, 401, "authentication required");
    for path in ["/health", "/healthz", "/livez"] {
        let (status, v) = send(anon.get(d.url(path))).await.unwrap();
        assert_eq!(status, 200, "{path}: {v}");
    }
    let (status, _) = send(anon.get(d.url("/readyz"))).await.unwrap();
    assert!(status == 200 || status == 503, "{status}");
    // Protected metrics: 401 without, 200 with a token or an allowed certificate.
    let (status, _) = send(anon.get(d.url("/metrics"))).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = send(anon.get(d.url("/metrics")).bearer_auth(TOKEN_CI))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let c = pki.client("orchestrator");
    let (status, _) = send(c.get(d.url("/metrics"))).await.unwrap();
    assert_eq!(status, 200);

    // Both token headers work; the name of a `name:token` line is the identity.
    let body = provision_body(dir, "vm-token");
    let (status, v) = send(anon.post(&jobs).bearer_auth(TOKEN_CI).json(&body))
        .await
        .unwrap();
    assert_eq!(status, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let (status, job) = send(
        anon.get(d.url(&format!("/api/v1/jobs/{id}")))
            .header("x-api-token", TOKEN_ANON),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["requested_by"], "ci-runner", "{job}");
    let (status, _) = send(anon.get(&jobs).header("x-api-token", TOKEN_CI))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // An unnamed token's identity is `token-` and 8 hex digits of its SHA-256.
    let body2 = provision_body(dir, "vm-anon-token");
    let (status, v) = send(
        anon.post(&jobs)
            .header("x-api-token", TOKEN_ANON)
            .json(&body2),
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{v}");
    let (_, job) = send(
        anon.get(d.url(&format!("/api/v1/jobs/{}", v["job_id"].as_str().unwrap())))
            .bearer_auth(TOKEN_CI),
    )
    .await
    .unwrap();
    let by = job["requested_by"].as_str().unwrap();
    assert!(by.starts_with("token-") && by.len() == 14, "{job}");

    // Bad tokens: 401, whatever the form. reqwest speaks HTTP/2 here, which keeps a trailing
    // space in the header value.
    let bad: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("wrong token", anon.get(&jobs).bearer_auth(TOKEN_WRONG)),
        (
            "lower-case scheme",
            anon.get(&jobs)
                .header("authorization", format!("bearer {TOKEN_CI}")),
        ),
        (
            "trailing space",
            anon.get(&jobs)
                .header("authorization", format!("Bearer {TOKEN_CI} ")),
        ),
        (
            "trailing space, X-API-Token",
            anon.get(&jobs)
                .header("x-api-token", format!("{TOKEN_CI} ")),
        ),
        (
            "two spaces",
            anon.get(&jobs)
                .header("authorization", format!("Bearer  {TOKEN_CI}")),
        ),
        (
            "empty bearer",
            anon.get(&jobs).header("authorization", "Bearer "),
        ),
        (
            "empty X-API-Token",
            anon.get(&jobs).header("x-api-token", ""),
        ),
        (
            "prefix of a token",
            anon.get(&jobs).bearer_auth(&TOKEN_CI[..32]),
        ),
        (
            "basic scheme",
            anon.get(&jobs)
                .header("authorization", format!("Basic {TOKEN_CI}")),
        ),
        (
            "both headers",
            anon.get(&jobs)
                .bearer_auth(TOKEN_CI)
                .header("x-api-token", TOKEN_CI),
        ),
        // A wrong token is refused even with an allowed certificate.
        (
            "allowed cert, wrong token",
            c.get(&jobs).bearer_auth(TOKEN_WRONG),
        ),
    ];
    for (case, req) in bad {
        let r = req.send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "{case}");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 401, "{case}: {text}");
        assert!(
            !text.contains("0123456789abcdef"),
            "{case}: body echoes the token: {text}"
        );
    }

    // Certificates in optional mode: an allowed one (matched by DNS SAN) is enough; one not
    // allowed gets 403 unless it also sends a valid token; foreign and expired ones fail.
    let (status, _) = send(c.get(&jobs)).await.unwrap();
    assert_eq!(status, 200);
    let body3 = provision_body(dir, "vm-cert-optional");
    let (status, v) = send(c.post(&jobs).json(&body3)).await.unwrap();
    assert_eq!(status, 202, "{v}");
    let (_, job) = send(c.get(d.url(&format!("/api/v1/jobs/{}", v["job_id"].as_str().unwrap()))))
        .await
        .unwrap();
    assert_eq!(job["requested_by"], "orchestrator.example.com", "{job}");
    let intruder = pki.client("intruder");
    let (status, _) = send(intruder.get(&jobs)).await.unwrap();
    assert_eq!(status, 403);
    let (status, _) = send(intruder.get(&jobs).bearer_auth(TOKEN_CI))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for who in ["foreign", "expired"] {
        let r = send(pki.client(who).get(d.url("/health"))).await;
        assert!(r.is_err(), "{who}: {r:?}");
    }

    if curl_available() {
        let ca = pki.file("ca.crt");
        let url = d.url("/api/v1/jobs");
        let auth = format!("Authorization: Bearer {TOKEN_CI}");
        let xauth = format!("X-API-Token: {TOKEN_ANON}");
        for version in ["--http1.1", "--http2"] {
            let (rc, status, body) = curl(&["--cacert", &ca, version, "-H", &auth, &url]);
            assert_eq!((rc, status), (0, 200), "{version}: {body}");
            let (_, status, _) = curl(&["--cacert", &ca, version, "-H", &xauth, &url]);
            assert_eq!(status, 200, "{version}");
            let (_, status, body) = curl(&["--cacert", &ca, version, &url]);
            assert_eq!(status, 401, "{version}");
            assert!(
                body.contains("\"error\":\"authentication required\""),
                "{body}"
            );
            let lower = format!("Authorization: bearer {TOKEN_CI}");
            let (_, status, _) = curl(&["--cacert", &ca, version, "-H", &lower, &url]);
            assert_eq!(status, 401, "{version}");
            let wrong = format!("Authorization: Bearer {TOKEN_WRONG}");
            let (_, status, _) = curl(&["--cacert", &ca, version, "-H", &wrong, &url]);
            assert_eq!(status, 401, "{version}");
            let (_, status, _) = curl(&["--cacert", &ca, version, "-H", "X-API-Token;", &url]);
            assert_eq!(status, 401, "{version}: empty X-API-Token");
        }
        // A trailing space: HTTP/1.1 parsing strips whitespace around field values (RFC 9110,
        // 5.5), so the daemon sees the exact token; HTTP/2 keeps it and the token is refused.
        let trailing = format!("Authorization: Bearer {TOKEN_CI} ");
        let (_, status, _) = curl(&["--cacert", &ca, "--http1.1", "-H", &trailing, &url]);
        assert_eq!(status, 200);
        let (_, status, _) = curl(&["--cacert", &ca, "--http2", "-H", &trailing, &url]);
        assert_eq!(status, 401);
        // Protected metrics with a token, as the ServiceMonitor's bearerTokenSecret does.
        let (_, status, body) = curl(&["--cacert", &ca, "-H", &auth, &d.url("/metrics")]);
        assert_eq!(status, 200);
        assert!(
            body.contains("libvirt_volume_provisioner_auth_failures_total"),
            "{body}"
        );
    }

    let (_, text) = get(&c, &d.url("/metrics")).await;
    let text = text.as_str().unwrap().to_string();
    assert!(auth_failures(&text, "missing_credentials") >= 2, "{text}");
    assert!(auth_failures(&text, "invalid_token") >= 5, "{text}");
    assert!(auth_failures(&text, "malformed_credentials") >= 3, "{text}");
    assert!(auth_failures(&text, "client_not_allowed") >= 1, "{text}");
    let log = d.log();
    assert!(log.contains("\"identity\":\"ci-runner\""), "{log}");
    assert!(log.contains("\"reason\":\"invalid_token\""), "{log}");
    assert_no_secret_in_log(&d);
}

/// Reads until EOF or error; returns what was read and when the stream ended.
async fn read_to_end_timed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    limit: Duration,
) -> (String, Option<Instant>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&out).into(), Some(Instant::now()));
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), None),
        }
    }
}

#[tokio::test]
async fn slow_clients_and_plain_http_are_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = tls_pki(dir);
    // Files given as systemd credential names, resolved in $CREDENTIALS_DIRECTORY.
    let tokens = pki.dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN_CI}\n")).unwrap();
    let config = TestConfig::new(dir)
        .set("tls.cert_file", "server.crt")
        .set("tls.key_file", "server.key")
        .set("auth.tokens_file", "tokens")
        .set("server.header_timeout", "2s")
        .set("server.handshake_timeout", "2s")
        .set("server.body_timeout", "2s")
        .set("server.max_connections", 3);
    let creds = pki.dir.display().to_string();
    let d = Daemon::start_https(dir, &config, &[("CREDENTIALS_DIRECTORY", &creds)]);
    let addr = d.base.trim_start_matches("https://").to_string();
    let connector = pki.rustls_connector(b"http/1.1");
    let server_name = localhost();

    // Metrics are open by default, the API is not.
    let c = pki.anonymous_client();
    let (status, _) = send(c.get(d.url("/metrics"))).await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = send(c.get(d.url("/api/v1/jobs"))).await.unwrap();
    assert_eq!(status, 401);

    // Headers trickling in one byte every 300 ms: disconnected after the header timeout.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = connector.connect(server_name.clone(), tcp).await.unwrap();
    let start = Instant::now();
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut closed_after = None;
    for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        let mut probe = [0u8; 512];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), tls.read(&mut probe)).await {
            // EOF, an error, or hyper's 408 just before it closes.
            let _ = r;
            closed_after = Some(start.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("slow header client was never disconnected");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(6),
        "closed after {closed_after:?}"
    );

    // An idle connection after the handshake is closed after the header timeout too.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = connector.connect(server_name.clone(), tcp).await.unwrap();
    let start = Instant::now();
    let (_, ended) = read_to_end_timed(&mut tls, Duration::from_secs(10)).await;
    let took = ended.expect("idle TLS connection stays open") - start;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // A TCP connection that never starts the TLS handshake: closed after the handshake timeout.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    let (_, ended) = read_to_end_timed(&mut tcp, Duration::from_secs(10)).await;
    let took = ended.expect("silent TCP connection stays open") - start;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // A body that never arrives completely: 408 after the body timeout.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = connector.connect(server_name.clone(), tcp).await.unwrap();
    let start = Instant::now();
    tls.write_all(
        format!(
            "POST /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN_CI}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"image_url\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (text, _) = read_to_end_timed(&mut tls, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"request timeout\""), "{text}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // Plain HTTP on the TLS port: a JSON 400, then the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (text, ended) = read_to_end_timed(&mut tcp, Duration::from_secs(5)).await;
    assert!(ended.is_some(), "connection not closed");
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.ends_with("\"message\":\"this port serves HTTPS; use https://\",\"code\":400}"),
        "{text}"
    );

    // At most 3 connections: with 3 silent ones open, a request waits until they are cut off.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    // A new client: `c` would reuse its pooled connection.
    let (status, _) = send(pki.anonymous_client().get(d.url("/health")))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        start.elapsed()
    );
    drop(silent);

    // The daemon still serves normally.
    let (status, _) = send(c.get(d.url("/api/v1/jobs")).bearer_auth(TOKEN_CI))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(d.log().contains("\"api_tokens\":1"), "{}", d.log());
    assert_no_secret_in_log(&d);
}

/// Runs `serve` on a config that must be refused; returns its stderr.
fn refused_start(dir: &Path, config: &TestConfig) -> String {
    let path = dir.join("refused.toml");
    std::fs::write(&path, config.render()).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "the daemon started: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not refuse the configuration");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn insecure_or_broken_security_settings_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = tls_pki(dir);

    // Plain HTTP on a non-loopback address.
    let public = TestConfig::new(dir).set("server.listen", "0.0.0.0:0");
    let err = refused_start(dir, &public);
    assert!(
        err.contains("tls.cert_file: the API would be plain HTTP on 0.0.0.0:0"),
        "{err}"
    );
    // ... even with allow_insecure_http, something must authenticate callers.
    let err = refused_start(dir, &public.clone().set("tls.allow_insecure_http", true));
    assert!(
        err.contains("auth: no client authentication is configured"),
        "{err}"
    );
    // TLS on a non-loopback address without client CA and tokens.
    let tls_only = pki
        .server_tls(TestConfig::new(dir), None)
        .set("server.listen", "0.0.0.0:0");
    let err = refused_start(dir, &tls_only);
    assert!(
        err.contains("auth: no client authentication is configured"),
        "{err}"
    );

    // A short token: file and line named, the token never printed.
    let tokens = dir.join("short-tokens");
    let short = "tooShortSecret-1234";
    let mut f = std::fs::File::create(&tokens).unwrap();
    writeln!(f, "# comment\n{TOKEN_CI}\nbackup:{short}").unwrap();
    let err = refused_start(
        dir,
        &TestConfig::new(dir).set("auth.tokens_file", tokens.display().to_string()),
    );
    assert!(
        err.contains(&format!(
            "auth.tokens_file: {} line 3: the token is 19 characters long; at least 32 are required",
            tokens.display()
        )),
        "{err}"
    );
    assert!(!err.contains(short) && !err.contains(TOKEN_CI), "{err}");

    // A key that does not belong to the certificate.
    let err = refused_start(
        dir,
        &pki.server_tls(TestConfig::new(dir), Some("required"))
            .set("tls.key_file", pki.file("intruder.key")),
    );
    assert!(
        err.contains("tls.key_file: ") && err.contains("does not fit tls.cert_file"),
        "{err}"
    );
    // A client CA file without certificates.
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    let err = refused_start(
        dir,
        &pki.server_tls(TestConfig::new(dir), Some("required")).set(
            "tls.client_ca_file",
            dir.join("empty.pem").display().to_string(),
        ),
    );
    assert!(
        err.contains("tls.client_ca_file: ") && err.contains("no PEM CERTIFICATE"),
        "{err}"
    );

    // check-config reports the same problems.
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        TestConfig::new(dir)
            .set("auth.tokens_file", tokens.display().to_string())
            .render(),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: the token is 19 characters long"),
        "{err}"
    );
    assert!(!err.contains(short), "{err}");
}
