//! glibc malloc settings for tensor workloads.
//!
//! candle allocates a fresh buffer for almost every op. With glibc's defaults, buffers above the
//! dynamic mmap threshold come from `mmap` and go back with `munmap`, and freed heap tops are
//! trimmed, so every forward pass pays page faults and kernel zero-filling for memory it just gave
//! back. Measured on the SD 1.5 UNet at 256×256 (`bench_unet`, 2 cores, load 0.70 before and 1.43
//! after, old and new binaries alternated): the forward went from 4.16 / 3.81 s to 3.14 / 3.05 s
//! and forward+backward from 8.77 s to 6.07 s, with the same peak RSS (4.41 GB).
//!
//! The settings: allocations up to 32 MiB come from the heap (`M_MMAP_THRESHOLD`), and freed
//! memory is neither trimmed below 2 GiB (`M_TRIM_THRESHOLD`) nor grown in steps under 256 MiB
//! (`M_TOP_PAD`). Elsewhere than glibc this does nothing.

/// Applies the settings; returns whether every one was accepted (always `false` off glibc).
pub fn tune_for_tensors() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_TOP_PAD: c_int = -2;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; the values are in range for c_int.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
                && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1
                && mallopt(M_TOP_PAD, 256 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Settings for training, whose live set (weights, gradients, two optimizer moments) is most of
/// the machine: buffers from 1 MiB up come from `mmap` and go back to the system when freed, so
/// the resident size follows what is alive instead of the high-water mark of freed heap memory.
/// Measured on the CPU with SD 1.5 (random weights): DreamBooth at 64×64 went from killed at
/// 24 GB to a 20.9 GB peak; Textual Inversion at 256×256, whose live set is small, slowed from
/// 5.9–6.5 s to 10.6–11.3 s per micro-batch (page faults of fresh mappings), so `pnd train`
/// uses these settings for DreamBooth only.
pub fn tune_for_training() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; the values are in range for c_int.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings_and_allocation_still_works() {
        let ok = super::tune_for_tensors();
        assert_eq!(ok, cfg!(all(target_os = "linux", target_env = "gnu")));
        let v = vec![1.5f32; 20 << 20]; // 80 MB: above the threshold, still served
        assert_eq!(
            v.iter().map(|&x| x as f64).sum::<f64>(),
            1.5 * (20 << 20) as f64
        );
    }
}
