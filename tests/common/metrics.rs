//! Reading the daemon's Prometheus metrics: the whole /metrics text and one metric's value.

use super::daemon::Daemon;

/// The daemon's whole /metrics text.
pub async fn scrape(c: &reqwest::Client, d: &Daemon) -> String {
    let r = c.get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET /metrics");
    r.text().await.unwrap()
}

/// A metric's value in a /metrics text: the sum over the label sets that contain every
/// `name="value"` pair of `labels` (comma-separated, any order; "" matches all).
pub fn metric_in(text: &str, name: &str, labels: &str) -> f64 {
    let pairs: Vec<String> = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.ends_with('"') {
                p.to_string()
            } else {
                format!("{p}\"")
            }
        })
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric_name = series.split('{').next().unwrap_or("");
            metric_name == name && pairs.iter().all(|p| series.contains(p.as_str()))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A metric's value from the daemon's /metrics (sum over label sets matching `labels`).
pub async fn metric(c: &reqwest::Client, d: &Daemon, name: &str, labels: &str) -> f64 {
    let text = c
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_in(&text, name, labels)
}
