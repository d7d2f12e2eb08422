//! The relative error of a gradient check (no dependencies: `tests/support` includes this file).

/// Relative error between an analytic and a numeric gradient: the largest
/// `|g_i − fd_i| / max(|fd_i|, 1e-3 · max_j |fd_j|)` (the floor keeps components that are
/// zero up to rounding from dominating).
pub fn relative_error(analytic: &[f64], numeric: &[f64]) -> f64 {
    let scale = numeric.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    let floor = (1e-3 * scale).max(1e-300);
    analytic
        .iter()
        .zip(numeric)
        .map(|(g, n)| (g - n).abs() / n.abs().max(floor))
        .fold(0.0, f64::max)
}
