//! SHA-256 throughput of the `sha2` crate as the daemon uses it (run by benches/download.sh
//! beside `openssl speed sha256`): 1 GiB hashed in 1 MiB updates, best of three.

use sha2::{Digest, Sha256};
use std::time::Instant;

fn main() {
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    // `cargo test --all-targets` runs this too (debug build): a quick pass only.
    let mib = if cfg!(debug_assertions) { 16 } else { 1024 };
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let mut h = Sha256::new();
        for _ in 0..mib {
            h.update(&block);
        }
        std::hint::black_box(h.finalize());
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!("sha2 crate: {:.0} MB/s", (mib << 20) as f64 / best / 1e6);
}
