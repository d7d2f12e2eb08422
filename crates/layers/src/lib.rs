//! Candle building blocks shared by the metric and diffusion models.

mod activation;
pub mod allocator;
pub mod attention;
pub mod fused;
pub mod host;
pub mod kernels;
pub mod threads;
pub mod vmath;

pub use activation::{Activation, UnsupportedActivation};

/// Helpers of this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Tensor};

    /// `max |a − b|` over all entries of two tensors of one shape, in f64.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
