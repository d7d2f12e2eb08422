//! CPU thread settings for candle.
//!
//! candle 0.11.1 runs its GEMMs on the rayon pool (`RAYON_NUM_THREADS` threads) and its
//! elementwise unary and binary ops on a second, private pool of `CANDLE_NUM_THREADS − 1` threads
//! that spin-wait between jobs. With as many rayon threads as cores, the two pools fight for the
//! cores: on 2 cores a perf profile of the SD 1.5 UNet forward+backward (`bench_unet fwdbwd`) spent
//! 19% of its samples in the caller's spin-wait for that pool (`BarrierGuard::drop`) and 8% more in
//! its worker's loop. One thread for the elementwise pool (the caller runs those ops inline) took
//! the same run from 3.07–3.38 s to 2.58–2.73 s (two alternating rounds, load 2–3.4 from builds
//! beside it). Our own elementwise kernels ([`crate::host`], the diffusion crate's ops) use rayon.

/// Sets `CANDLE_NUM_THREADS=1` unless the user set it; returns whether it did. Call it first thing
/// in `main`, before any candle op and before other threads exist.
pub fn single_elementwise_pool() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    // Called at the start of `main`, before any other thread runs (the documented contract), so
    // nothing reads the environment concurrently.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}
