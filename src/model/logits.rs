//! The few best logits of each row of a step's logits, found where the logits are: a batched
//! server step on a GPU then copies k (id, value) pairs a sequence to the host instead of its
//! whole vocabulary (64 sequences of a 32000-token vocabulary are 8 MB of f32 a step, of
//! Llama-3's 128256 tokens 33 MB), and the rows a sampler needs whole are copied alone.
use candle_core::{DType, Device, Result, Tensor};

/// The largest `k` [`top_k_rows`] takes.
pub const TOP_K_MAX: usize = 256;

/// A key whose unsigned order is the order of the values: -0 below +0 (as `f32::total_cmp`),
/// every NaN below every number (a sampler never draws NaN). The CUDA kernel uses the same map.
pub fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return 0;
    }
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Higher value first, then lower id, NaN last: the order of [`top_k_rows`], and the order a
/// sampler ranks its candidates in.
pub fn rank_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    order_key(b.1).cmp(&order_key(a.1)).then(a.0.cmp(&b.0))
}

/// The `k` largest values of each row of `logits` (`[rows, vocab]`, f32) as (id, value), by
/// falling value then rising id, NaN last; `k` is cut to the vocabulary. On a CUDA device a
/// kernel selects them and only they come to the host.
pub fn top_k_rows(logits: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let (rows, vocab) = logits.dims2()?;
    let k = k.min(vocab);
    if k == 0 || k > TOP_K_MAX || logits.dtype() != DType::F32 {
        candle_core::bail!("logits top-k: k = {k} of {rows} rows of {vocab} {:?} values (k from 1 to {TOP_K_MAX}, f32)", logits.dtype());
    }
    match logits.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (values, ids) = super::cuda::topk::logits_top_k(logits, k)?;
            let (values, ids) = (values.to_vec2::<f32>()?, ids.to_vec2::<u32>()?);
            Ok(ids.into_iter().zip(values).map(|(i, v)| i.into_iter().zip(v).collect()).collect())
        }
        _ => Ok(logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?.iter().map(|row| top_k_of(row, k)).collect()),
    }
}

/// [`top_k_rows`] of one row on the host: one pass that keeps a buffer of a few k pairs and prunes
/// it to its best k whenever it fills, so that most of a vocabulary costs one comparison each.
pub fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let cap = 4 * k.max(16);
    let mut buf: Vec<(u32, f32)> = Vec::with_capacity(cap);
    // Keys at or below `bar` cannot be among the k best once the buffer has been pruned.
    let mut bar: Option<u32> = None;
    for (i, &v) in row.iter().enumerate() {
        if bar.is_some_and(|b| order_key(v) < b) {
            continue;
        }
        buf.push((i as u32, v));
        if buf.len() == cap {
            buf.select_nth_unstable_by(k - 1, rank_order);
            buf.truncate(k);
            bar = Some(order_key(buf[k - 1].1));
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, rank_order);
        buf.truncate(k);
    }
    buf.sort_unstable_by(rank_order);
    buf
}

/// Rows `which` of `logits` (`[rows, vocab]`, f32), copied whole, in `which`'s order.
pub fn rows(logits: &Tensor, which: &[usize]) -> Result<Vec<Vec<f32>>> {
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let (n, _) = logits.dims2()?;
    if let Some(&bad) = which.iter().find(|&&r| r >= n) {
        candle_core::bail!("logits: row {bad} of {n}");
    }
    if which.len() == n && which.iter().enumerate().all(|(i, &r)| i == r) {
        return logits.to_vec2::<f32>();
    }
    let idx: Vec<u32> = which.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, which.len(), logits.device())?;
    logits.index_select(&idx, 0)?.to_vec2::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every pair sorted by the order, cut to k: what the selection must return.
    fn reference(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        all.sort_by(rank_order);
        all.truncate(k);
        all
    }

    fn same(a: &[(u32, f32)], b: &[(u32, f32)]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
    }

    #[test]
    fn the_key_orders_as_total_cmp_with_nan_lowest() {
        let vals = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        for w in vals.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{} < {}", w[0], w[1]);
        }
        assert!(order_key(f32::NAN) < order_key(f32::NEG_INFINITY));
        assert!(order_key(-f32::NAN) < order_key(f32::NEG_INFINITY));
    }

    #[test]
    fn the_best_k_in_order_with_ties_nan_and_infinities() {
        let mut rng = Rng::new(11);
        for &(vocab, k) in &[(1, 1), (7, 3), (7, 7), (100, 40), (1000, 1), (1000, 8), (4099, 256), (32000, 40)] {
            for case in 0..4 {
                let row: Vec<f32> = (0..vocab)
                    .map(|_| match case {
                        // Few distinct values: long runs of ties across the k-th place.
                        0 => (rng.next_u64() % 5) as f32 - 2.0,
                        1 => match rng.next_u64() % 50 {
                            0 => f32::NAN,
                            1 => f32::INFINITY,
                            2 => f32::NEG_INFINITY,
                            3 => -0.0,
                            4 => 0.0,
                            _ => rng.normal(),
                        },
                        2 => f32::NAN,
                        _ => rng.normal() * 4.0,
                    })
                    .collect();
                let got = top_k_of(&row, k);
                assert!(same(&got, &reference(&row, k)), "vocab {vocab} k {k} case {case}: {got:?}");
            }
        }
    }

    #[test]
    fn rows_and_top_k_rows_of_a_tensor() {
        let t = Tensor::new(&[[1f32, 5.0, 3.0, 5.0], [0.5, -1.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(top_k_rows(&t, 2).unwrap(), vec![vec![(1, 5.0), (3, 5.0)], vec![(2, 2.0), (0, 0.5)]]);
        assert_eq!(top_k_rows(&t, 9).unwrap()[1].len(), 4);
        assert_eq!(rows(&t, &[1]).unwrap(), vec![vec![0.5, -1.0, 2.0, 0.0]]);
        assert_eq!(rows(&t, &[0, 1]).unwrap().len(), 2);
        let e = rows(&t, &[2]).unwrap_err().to_string();
        assert!(e.contains("row 2 of 2"), "{e}");
        let e = top_k_rows(&t, 0).unwrap_err().to_string();
        assert!(e.contains("k = 0") && e.contains("k from 1 to 256"), "{e}");
        let e = top_k_rows(&t.to_dtype(DType::F16).unwrap(), 2).unwrap_err().to_string();
        assert!(e.contains("F16") && e.contains("f32"), "{e}");
    }
}
