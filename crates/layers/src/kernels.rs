//! Which implementation a primitive runs: our CPU kernels, or the device-generic composition of
//! candle ops that CUDA (and every other device) runs.
//!
//! Our CPU kernels (the diffusion crate's precomputed ops with analytic backwards, the metrics'
//! two-pass LayerNorm) run only when the tensor lives on the CPU and the generic path is not
//! forced. Forcing it on the CPU is how the GPU path is proven without a GPU: the tests compare the
//! two paths' values and finite-difference gradients op by op and through whole models.
//!
//! The switch is per thread ([`force_generic`], a scope guard, for tests) or per process
//! (`PND_GENERIC_OPS=1` in the environment, read once).

use candle_core::Device;
use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

fn forced_by_env() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| std::env::var("PND_GENERIC_OPS").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Whether the generic path is forced on this thread (by [`force_generic`] or `PND_GENERIC_OPS`).
pub fn generic_forced() -> bool {
    FORCED.with(Cell::get) || forced_by_env()
}

/// Whether our CPU kernels may run for a tensor on `device`.
pub fn host_kernels(device: &Device) -> bool {
    device.is_cpu() && !generic_forced()
}

/// Forces the device-generic path on this thread until the guard drops.
#[must_use = "the generic path is forced only while the guard lives"]
pub struct ForceGeneric {
    previous: bool,
}

/// Forces the device-generic implementation of every primitive on this thread while the returned
/// guard lives.
pub fn force_generic() -> ForceGeneric {
    let previous = FORCED.with(|f| f.replace(true));
    ForceGeneric { previous }
}

impl Drop for ForceGeneric {
    fn drop(&mut self) {
        FORCED.with(|f| f.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_forces_the_generic_path_and_restores_on_drop() {
        if forced_by_env() {
            return; // the whole process runs generic: nothing to toggle
        }
        assert!(host_kernels(&Device::Cpu));
        {
            let _outer = force_generic();
            assert!(!host_kernels(&Device::Cpu));
            {
                let _inner = force_generic();
                assert!(generic_forced());
            }
            assert!(
                generic_forced(),
                "an inner guard must not lift an outer one"
            );
        }
        assert!(host_kernels(&Device::Cpu));
        // Other threads are unaffected.
        let _g = force_generic();
        assert!(std::thread::spawn(|| host_kernels(&Device::Cpu))
            .join()
            .unwrap());
    }
}
