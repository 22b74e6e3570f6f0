//! The two dense f64 routines GPTQ needs (docs/GPTQ.md, "The inverse Hessian"): a Cholesky
//! factorization and the upper Cholesky factor of a matrix's inverse. Written here rather than
//! taken from a linear-algebra crate: candle has neither, and faer or nalgebra would add minutes
//! to every 2-core build for two 30-line loops. Matrices are row-major `n × n` slices.

/// Factors the symmetric positive definite `a` in place into its lower Cholesky factor `L`
/// (`a = L·Lᵀ`; the upper triangle is zeroed). On failure returns the first pivot that is not
/// positive (the matrix is not positive definite, up to rounding).
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    debug_assert_eq!(a.len(), n * n);
    for j in 0..n {
        // L[j][k] for k < j are final; L[j][j] = sqrt(a[j][j] - Σ L[j][k]²).
        let row_j = &a[j * n..(j + 1) * n];
        let d = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if !(d > 0.0 && d.is_finite()) {
            return Err(j);
        }
        let ljj = d.sqrt();
        let lj: Vec<f64> = row_j[..j].to_vec();
        a[j * n + j] = ljj;
        a[j * n + j + 1..(j + 1) * n].fill(0.0);
        // L[i][j] = (a[i][j] - Σ_k L[i][k]·L[j][k]) / L[j][j] for i > j.
        for i in j + 1..n {
            let row_i = &mut a[i * n..(i + 1) * n];
            row_i[j] = (row_i[j] - dot(&row_i[..j], &lj)) / ljj;
        }
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four accumulators: the loop vectorizes and the sum does not depend on one long chain.
    let mut acc = [0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for l in 0..4 {
            acc[l] += a[4 * c + l] * b[4 * c + l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for k in 4 * chunks..a.len() {
        s += a[k] * b[k];
    }
    s
}

/// The inverse of a lower triangular matrix with a positive diagonal (row-major), lower again.
pub fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    // Row by row: row i of X = (e_i - Σ_{k<i} L[i][k]·(row k of X)) / L[i][i], where row k of X
    // is zero beyond column k: contiguous updates instead of a strided walk down columns.
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * n);
        let row = &mut rest[..n];
        for k in 0..i {
            let lik = l[i * n + k];
            if lik != 0.0 {
                for (r, &xk) in row[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                    *r -= lik * xk;
                }
            }
        }
        row[i] = 1.0;
        let d = l[i * n + i];
        for r in row[..=i].iter_mut() {
            *r /= d;
        }
    }
    x
}

/// The upper triangular `U` with `UᵀU = a⁻¹` (what GPTQ's column loop reads), for a symmetric
/// positive definite `a`; on failure the first pivot that is not positive.
///
/// One factorization instead of three: with `J` the order-reversing permutation, factor
/// `J·a·J = L·Lᵀ`; then `a⁻¹ = (J·L⁻ᵀ·J)·(J·L⁻¹·J)` and `U = J·L⁻¹·J` is upper triangular with a
/// positive diagonal, i.e. the Cholesky factor of `a⁻¹`, unique.
pub fn inverse_upper_cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let rev = |i: usize| n - 1 - i;
    let mut m = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = a[rev(i) * n + rev(j)];
        }
    }
    cholesky_lower(&mut m, n).map_err(rev)?;
    let li = invert_lower(&m, n);
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = li[rev(i) * n + rev(j)];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn spd(n: usize, rng: &mut Rng) -> Vec<f64> {
        // XᵀX of a tall random X plus a small ridge.
        let rows = 2 * n + 3;
        let x: Vec<f64> = (0..rows * n).map(|_| f64::from(rng.next_f32()) - 0.5).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..rows).map(|r| x[r * n + i] * x[r * n + j]).sum::<f64>() + if i == j { 1e-3 } else { 0.0 };
            }
        }
        a
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0f64; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + k] * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|i| a[(i % n) * n + i / n]).collect()
    }

    #[test]
    fn cholesky_reproduces_the_matrix() {
        let mut rng = Rng::new(3);
        for n in [1, 2, 7, 33] {
            let a = spd(n, &mut rng);
            let mut l = a.clone();
            cholesky_lower(&mut l, n).unwrap();
            let llt = matmul(&l, &transpose(&l, n), n);
            for (x, y) in llt.iter().zip(&a) {
                assert!((x - y).abs() < 1e-9 * (1.0 + y.abs()), "n={n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn inverse_upper_factor_times_matrix_is_identity() {
        let mut rng = Rng::new(5);
        for n in [1, 3, 17, 40] {
            let a = spd(n, &mut rng);
            let u = inverse_upper_cholesky(&a, n).unwrap();
            for i in 0..n {
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0, "U is upper triangular");
                }
                assert!(u[i * n + i] > 0.0);
            }
            let inv = matmul(&transpose(&u, n), &u, n);
            let id = matmul(&inv, &a, n);
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((id[i * n + j] - want).abs() < 1e-7, "n={n} ({i},{j}): {}", id[i * n + j]);
                }
            }
        }
    }

    #[test]
    fn not_positive_definite_names_the_pivot() {
        // diag(1, -1): the second pivot fails; through the reversal it is reported as row 1.
        let a = [1.0, 0.0, 0.0, -1.0];
        assert_eq!(cholesky_lower(&mut a.clone(), 2), Err(1));
        assert_eq!(inverse_upper_cholesky(&a, 2), Err(1));
    }
}
