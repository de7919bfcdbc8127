//! The bandwidth cap of all downloads together (`sources.max_bytes_per_second`, live): a GCRA
//! rate limiter from the `governor` crate, counted in 1 KiB cells. Every received chunk of
//! every remote download waits for its share before it is used.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per cell of the limiter (its counts are `u32`).
const CELL: u64 = 1024;

/// The shared cap; `None` inside means unlimited.
#[derive(Default)]
pub(crate) struct Bandwidth {
    current: RwLock<Option<Cap>>,
}

/// A configured cap and the token bucket that enforces it.
#[derive(Clone)]
struct Cap {
    bytes_per_second: u64,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Largest number of cells one wait may ask for (the limiter's burst).
    burst: u32,
}

impl Bandwidth {
    /// Sets the cap (`0`: unlimited); a changed value applies to the next chunk of every
    /// running download.
    pub(crate) fn set(&self, bytes_per_second: u64) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().map_or(0, |c| c.bytes_per_second) == bytes_per_second {
            return;
        }
        *current = cap(bytes_per_second);
    }

    /// Waits until `bytes` more fit under the cap.
    pub(crate) async fn take(&self, bytes: usize) {
        let Some(cap) = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let n = cells.min(cap.burst as u64) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                // `n` never exceeds the burst, so capacity is always sufficient.
                let _ = cap.limiter.until_n_ready(n).await;
            }
            cells -= n as u64;
        }
    }
}

fn cap(bytes_per_second: u64) -> Option<Cap> {
    let per_second = u32::try_from(bytes_per_second.div_ceil(CELL)).unwrap_or(u32::MAX);
    let rate = NonZeroU32::new(per_second)?;
    // A burst of 1/20 s of traffic (at least 64 KiB): smooth, yet large enough for a chunk.
    let burst = (per_second / 20).max(64);
    let quota = Quota::per_second(rate).allow_burst(NonZeroU32::new(burst)?);
    Some(Cap {
        bytes_per_second,
        limiter: Arc::new(RateLimiter::direct(quota)),
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cap_holds_and_can_change() {
        let b = Bandwidth::default();
        let started = std::time::Instant::now();
        b.take(10 << 20).await;
        assert!(started.elapsed().as_millis() < 100, "unlimited by default");
        b.set(4 << 20);
        let started = std::time::Instant::now();
        for _ in 0..64 {
            b.take(32 << 10).await;
        }
        // 2 MiB at 4 MiB/s: about half a second (the first burst comes free).
        let t = started.elapsed().as_secs_f64();
        assert!((0.35..1.0).contains(&t), "{t}");
        b.set(0);
        let started = std::time::Instant::now();
        b.take(10 << 20).await;
        assert!(started.elapsed().as_millis() < 100, "unlimited again");
    }
}
