//! Timing for the kernel examples (`mod timing;` in each): one warm-up call, then `reps` timed
//! calls.
use std::time::Instant;

/// Median and fastest of `reps` timed calls after a warm-up, in µs (the fastest is steadier on a
/// shared VM whose speed drifts between calls).
pub fn time_us(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[reps / 2], t[0])
}
