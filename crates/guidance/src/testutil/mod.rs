//! Finite-difference gradient checks in f64 for the unit tests (the integration tests include
//! [`relative_error`]'s file from `tests/support`).

mod relative;

use crate::error::Result;
use candle_core::{Device, Tensor, Var};
pub use relative::relative_error;

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
        return Err(candle_core::Error::Msg(format!(
            "finite-difference check: relative error {err:e} (scale {scale:e})\n\
             analytic {a:?}\nnumeric  {n:?}"
        ))
        .into());
    }
    Ok(())
}
