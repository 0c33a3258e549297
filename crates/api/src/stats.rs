//! The Wilson score interval, for success rates measured on few trials (the dashboard, the lab
//! matrices and campaigns).

/// The 95% Wilson score interval of `successes` out of `n`, as (low, high) fractions.
pub fn wilson95(successes: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = f64::from(n);
    let p = f64::from(successes) / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_values() {
        // 20/20: the interval is about [0.839, 1].
        let (lo, hi) = wilson95(20, 20);
        assert!((lo - 0.8389).abs() < 1e-3, "{lo}");
        assert!((hi - 1.0).abs() < 1e-9);
        // 5/10: about [0.237, 0.763].
        let (lo, hi) = wilson95(5, 10);
        assert!(
            (lo - 0.2366).abs() < 1e-3 && (hi - 0.7634).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson95(0, 0), (0.0, 1.0));
    }
}
