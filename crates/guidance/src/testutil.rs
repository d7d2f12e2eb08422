//! Finite-difference gradient checks in f64, shared by the unit and integration tests.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};

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

/// Central finite differences (step `1e-6`) of the scalar `f` at `x0`.
pub fn numeric_gradient(
    x0: &[f64],
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
    step: f64,
) -> Result<Vec<f64>> {
    let dev = Device::Cpu;
    let mut out = Vec::with_capacity(x0.len());
    let mut x = x0.to_vec();
    for i in 0..x0.len() {
        x[i] = x0[i] + step;
        let up = f(&Tensor::new(x.as_slice(), &dev)?)?.to_scalar::<f64>()?;
        x[i] = x0[i] - step;
        let down = f(&Tensor::new(x.as_slice(), &dev)?)?.to_scalar::<f64>()?;
        x[i] = x0[i];
        out.push((up - down) / (2.0 * step));
    }
    Ok(out)
}

/// The analytic gradient of the scalar `f` at `x0` by candle's backward pass.
pub fn analytic_gradient(
    x0: &[f64],
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<f64>> {
    let var = Var::new(x0, &Device::Cpu)?;
    let y = f(var.as_tensor())?;
    let grads = y.backward()?;
    match grads.get(var.as_tensor()) {
        Some(g) => Ok(g.to_vec1()?),
        None => Ok(vec![0.0; x0.len()]),
    }
}

/// Asserts that candle's gradient of `f` at `x0` matches central finite differences to `tol`
/// (relative, see [`relative_error`]); also fails when the gradient is identically zero while
/// the numeric one is not.
pub fn check_gradient(
    x0: &[f64],
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
    tol: f64,
) -> Result<()> {
    let a = analytic_gradient(x0, &mut f)?;
    let n = numeric_gradient(x0, &mut f, 1e-6)?;
    let err = relative_error(&a, &n);
    let scale = n.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if err.is_nan() || err > tol || scale == 0.0 {
        return Err(Error::Invalid {
            what: "finite-difference check",
            reason: format!(
                "relative error {err:e} (scale {scale:e})\nanalytic {a:?}\nnumeric  {n:?}"
            ),
        });
    }
    Ok(())
}
