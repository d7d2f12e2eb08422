//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

#[path = "../../src/testutil/relative.rs"]
mod relative;

use candle_core::Tensor;
pub use relative::relative_error;

/// The largest absolute difference of two f32 tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Checks the analytic gradient `grad` of the f64 scalar `f` at `z` against central differences
/// with step `h` along each of `directions`: relative error ([`relative_error`]) at most `1e-4`
/// and a numeric derivative that is not identically zero.
pub fn assert_directional_gradient(
    f: impl Fn(&Tensor) -> f64,
    z: &Tensor,
    grad: &Tensor,
    directions: &[Tensor],
    h: f64,
    label: &str,
) {
    let (mut analytic, mut numeric) = (vec![], vec![]);
    for u in directions {
        let fd =
            (f(&(z + (u * h).unwrap()).unwrap()) - f(&(z - (u * h).unwrap()).unwrap())) / (2.0 * h);
        analytic.push(
            (grad * u)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        );
        numeric.push(fd);
    }
    let err = relative_error(&analytic, &numeric);
    println!("{label}: rel err {err:e}, analytic {analytic:?} numeric {numeric:?}");
    assert!(numeric.iter().any(|v| v.abs() > 1e-8), "zero gradient");
    assert!(err <= 1e-4, "relative error {err:e}");
}
