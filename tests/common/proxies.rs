//! TCP proxies on loopback in front of a real server: slow networks, connections cut or reset,
//! S3 throttling answers, stalls.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP proxy on loopback that forwards to `target`, sending the server's answers at most at
/// `bytes_per_sec` (a slow network in front of a real server). Runs until the test ends; returns
/// its port.
pub fn throttled_proxy(target: u16, bytes_per_sec: u64) -> u16 {
    FaultProxy::start(target, vec![], Some(bytes_per_sec)).port
}

/// A TCP proxy on loopback in front of `target` whose first `failures` connections are cut
/// after `cut_after` bytes from the server (a network that drops mid-download); later
/// connections pass through. Returns the proxy's port.
pub fn flaky_proxy(target: u16, cut_after: usize, failures: usize) -> u16 {
    FaultProxy::start(target, vec![Fault::CutAfter(cut_after); failures], None).port
}

/// What the fault proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Forward, then cut the connection after this many bytes from the server.
    CutAfter(usize),
    /// Read the request and answer `503 Slow Down` (S3's XML body) without asking the server.
    SlowDown,
    /// Read the request and reset the connection (RST).
    Reset,
    /// Forward 64 KiB of the answer, then send nothing for this long, then close.
    Stall(Duration),
}

/// A TCP proxy on loopback in front of `target` that applies `plan[i]` to its i-th connection
/// (later connections pass), optionally throttles each connection's answers to `rate` bytes
/// per second, counts the bytes the server sent through it, and logs when each connection
/// came (for retry timing).
pub struct FaultProxy {
    /// The proxy's loopback port.
    pub port: u16,
    server_bytes: Arc<std::sync::atomic::AtomicU64>,
    arrivals: Arc<Mutex<Vec<(Instant, Fault)>>>,
}

impl FaultProxy {
    /// Starts the proxy in front of the loopback port `target`; it runs until the test ends.
    pub fn start(target: u16, plan: Vec<Fault>, rate: Option<u64>) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (counted, log) = (server_bytes.clone(), arrivals.clone());
        std::thread::spawn(move || {
            for (i, client) in listener.incoming().flatten().enumerate() {
                let fault = plan.get(i).copied().unwrap_or(Fault::Pass);
                log.lock().unwrap().push((Instant::now(), fault));
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let _ = proxy_connection(client, target, fault, rate, &counted);
                });
            }
        });
        FaultProxy {
            port,
            server_bytes,
            arrivals,
        }
    }

    /// Bytes the server sent through the proxy so far.
    pub fn server_bytes(&self) -> u64 {
        self.server_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When each connection arrived and what was done to it.
    pub fn arrivals(&self) -> Vec<(Instant, Fault)> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// Reads one request's headers (up to the blank line).
fn read_request_head(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn proxy_connection(
    mut client: std::net::TcpStream,
    target: u16,
    fault: Fault,
    rate: Option<u64>,
    counted: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    match fault {
        Fault::SlowDown => {
            read_request_head(&mut client)?;
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        Fault::Reset => {
            read_request_head(&mut client)?;
            let fd = std::os::fd::AsFd::as_fd(&client);
            nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            return Ok(());
        }
        _ => {}
    }
    let server = std::net::TcpStream::connect(("127.0.0.1", target))?;
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    let (mut from, mut to) = (server, client);
    let mut sent = 0usize;
    let chunk = rate.map_or(64 << 10, |r| (r / 20).clamp(1024, 64 << 10) as usize);
    let mut buf = vec![0u8; chunk];
    loop {
        let started = Instant::now();
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counted.fetch_add(n as u64, Ordering::Relaxed);
        match fault {
            Fault::CutAfter(limit) if sent + n >= limit => {
                let _ = to.write_all(&buf[..limit - sent]);
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Fault::Stall(d) if sent + n >= 64 << 10 => {
                let _ = to.write_all(&buf[..(64 << 10) - sent]);
                std::thread::sleep(d);
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
        if let Some(r) = rate {
            let budget = Duration::from_secs_f64(n as f64 / r as f64);
            if let Some(rest) = budget.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// An HTTP/1.1 reverse proxy on loopback in front of the loopback port `target` that counts
/// the requests whose path starts with `prefix` while they are in flight (from the request's
/// head to the end of the answer's body) and the most of them at once. It forwards the
/// client's `Host` header unchanged, so S3 SigV4 signatures made for the proxy's address hold
/// at the server behind it.
pub struct CountingProxy {
    /// The proxy's loopback port.
    pub port: u16,
    counts: Arc<RequestCounts>,
}

/// What a `CountingProxy` saw.
#[derive(Default)]
struct RequestCounts {
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    total: std::sync::atomic::AtomicUsize,
}

/// One counted request in flight; leaving when dropped (its answer's body ended or was
/// abandoned).
struct InFlight(Arc<RequestCounts>);

impl InFlight {
    fn enter(counts: &Arc<RequestCounts>) -> InFlight {
        use std::sync::atomic::Ordering::SeqCst;
        let now = counts.in_flight.fetch_add(1, SeqCst) + 1;
        counts.peak.fetch_max(now, SeqCst);
        counts.total.fetch_add(1, SeqCst);
        InFlight(counts.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The body a `CountingProxy` answers with.
type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

impl CountingProxy {
    /// Starts the proxy (on a thread and runtime of its own); it runs until the test ends.
    pub fn start(target: u16, prefix: &'static str) -> CountingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(RequestCounts::default());
        let shared = counts.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(Self::serve(listener, target, prefix, shared));
        });
        CountingProxy { port, counts }
    }

    async fn serve(
        listener: std::net::TcpListener,
        target: u16,
        prefix: &'static str,
        counts: Arc<RequestCounts>,
    ) {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (client, counts) = (client.clone(), counts.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    Self::forward(req, target, prefix, client.clone(), counts.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn forward(
        req: hyper::Request<hyper::body::Incoming>,
        target: u16,
        prefix: &'static str,
        client: reqwest::Client,
        counts: Arc<RequestCounts>,
    ) -> Result<hyper::Response<ProxyBody>, std::convert::Infallible> {
        use futures::TryStreamExt;
        use http_body_util::BodyExt;
        let guard = req
            .uri()
            .path()
            .starts_with(prefix)
            .then(|| InFlight::enter(&counts));
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers;
        for h in ["connection", "content-length", "transfer-encoding"] {
            headers.remove(h);
        }
        let sent = client
            .request(parts.method, format!("http://127.0.0.1:{target}{path}"))
            .headers(headers)
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(a) => a,
            Err(e) => {
                let body = http_body_util::Full::new(bytes::Bytes::from(e.to_string()))
                    .map_err(|never| match never {})
                    .boxed();
                let mut resp = hyper::Response::new(body);
                *resp.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                return Ok(resp);
            }
        };
        let mut resp = hyper::Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !matches!(name.as_str(), "connection" | "transfer-encoding") {
                resp = resp.header(name, value);
            }
        }
        let stream = answer
            .bytes_stream()
            .map_ok(move |chunk| {
                let _counted = &guard;
                hyper::body::Frame::data(chunk)
            })
            .map_err(std::io::Error::other);
        let body = http_body_util::StreamBody::new(stream).boxed();
        Ok(resp.body(body).unwrap())
    }

    /// The most counted requests in flight at once so far.
    pub fn peak(&self) -> usize {
        self.counts.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counted requests so far.
    pub fn total(&self) -> usize {
        self.counts.total.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts counting the peak afresh.
    pub fn reset_peak(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.counts
            .peak
            .store(self.counts.in_flight.load(SeqCst), SeqCst);
    }
}
