//! Device→host copies of the guidance code, counted (issue 24).
//!
//! On a GPU every copy to the host waits for the device to finish the work queued before it, so
//! the guided step reads back only what the host must see, batched: the subject masks (their
//! sizes decide the shapes of the appearance loss), the cost matrices of the exact EMD (its plan
//! is solved on the host) and, after the backward, the losses and gradient norms of every image
//! for the trace and the finite check. [`reads`] counts the copies made on this thread, so a test
//! can hold a gradient pass to that budget.

use candle_core::{Result, Tensor, WithDType};
use std::cell::Cell;

thread_local! {
    static READS: Cell<usize> = const { Cell::new(0) };
}

/// Device→host copies the guidance code has made on this thread so far.
pub fn reads() -> usize {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
}

/// The entries of `t` (any shape, flattened) on the host: one copy.
pub fn to_host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count();
    t.flatten_all()?.to_vec1::<T>()
}

/// The scalar `t` (any float dtype) as f64 on the host: one copy.
pub fn scalar(t: &Tensor) -> Result<f64> {
    count();
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}
