//! Cross-attention maps and subject masks (SPEC §7): head-averaged token maps, min–max
//! normalization over space, and the mask `M = [Â ≥ τ]`.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Head-averaged maps of the given tokens from attention probabilities.
///
/// # Shapes
/// - `probs`: `[batch, heads, hw, tokens]` (a captured `attn2` site)
/// - returns `[token_indices.len(), hw]`, of the batch entry `batch`
pub fn token_maps(probs: &Tensor, batch: usize, token_indices: &[usize]) -> Result<Tensor> {
    let dims = probs.dims();
    if dims.len() != 4 || batch >= dims[0] {
        return Err(Error::Shape {
            what: "attention probabilities",
            expected: format!("[batch > {batch}, heads, hw, tokens]"),
            got: dims.to_vec(),
        });
    }
    if let Some(&bad) = token_indices.iter().find(|&&t| t >= dims[3]) {
        return Err(Error::TokenIndex {
            index: bad,
            tokens: dims[3],
        });
    }
    let idx: Vec<u32> = token_indices.iter().map(|&t| t as u32).collect();
    let idx = Tensor::new(idx.as_slice(), probs.device())?;
    // [heads, hw, k] → mean over heads → [hw, k] → [k, hw]
    let maps = probs
        .narrow(0, batch, 1)?
        .squeeze(0)?
        .index_select(&idx, 2)?
        .mean(0)?
        .t()?
        .contiguous()?;
    Ok(maps)
}

/// Min–max normalizes each row over its last dimension, differentiably; a constant row becomes 0.
///
/// # Shapes
/// - `maps`: `[k, hw]` (any leading dims) → same shape
pub fn min_max_normalize(maps: &Tensor) -> Result<Tensor> {
    let min = maps.min_keepdim(D::Minus1)?;
    let max = maps.max_keepdim(D::Minus1)?;
    let range = (&max - &min)?;
    // Constant rows carry no spatial information: divide by 1 there instead of 0 (a constant,
    // outside the graph), so they normalize to 0 with a zero gradient.
    let zero_range = range.detach().eq(0.0)?.to_dtype(maps.dtype())?;
    let denom = (range + zero_range)?;
    Ok(maps.broadcast_sub(&min)?.broadcast_div(&denom)?)
}

/// Indices of the positions where the normalized map reaches `tau`: the mask `[Â ≥ τ]`.
/// The mask is a constant for the backward pass. One device→host copy.
///
/// # Shapes
/// - `normalized`: `[hw]`
pub fn mask_indices(normalized: &Tensor, tau: f64) -> Result<Vec<u32>> {
    Ok(mask_indices_many(std::slice::from_ref(normalized), tau)?.remove(0))
}

/// [`mask_indices`] of several maps with one device→host copy: the comparison `Â ≥ τ` runs on
/// the device (in f64, as exact as on the host) and only one byte per position crosses.
///
/// # Shapes
/// - each of `normalized`: `[hw]` (sizes may differ)
pub fn mask_indices_many(normalized: &[Tensor], tau: f64) -> Result<Vec<Vec<u32>>> {
    let mut flags = Vec::with_capacity(normalized.len());
    for m in normalized {
        if m.rank() != 1 {
            return Err(Error::Shape {
                what: "normalized map",
                expected: "[hw]".into(),
                got: m.dims().to_vec(),
            });
        }
        flags.push(m.to_dtype(DType::F64)?.ge(tau)?);
    }
    if flags.is_empty() {
        return Ok(Vec::new());
    }
    let all: Vec<u8> = crate::readback::to_host(&Tensor::cat(&flags, 0)?)?;
    let mut out = Vec::with_capacity(flags.len());
    let mut rest = all.as_slice();
    for f in &flags {
        let (mine, tail) = rest.split_at(f.dim(0)?);
        rest = tail;
        out.push(
            mine.iter()
                .enumerate()
                .filter(|(_, &on)| on != 0)
                .map(|(i, _)| i as u32)
                .collect(),
        );
    }
    Ok(out)
}

/// The subject mask of one layer: head-averaged subject-token map, min–max normalized, ≥ τ.
///
/// # Shapes
/// - `probs`: `[batch, heads, hw, tokens]`; returns indices into `hw`
pub fn subject_mask(
    probs: &Tensor,
    batch: usize,
    subject_token: usize,
    tau: f64,
) -> Result<Vec<u32>> {
    let map = token_maps(&probs.detach(), batch, &[subject_token])?;
    let norm = min_max_normalize(&map)?.squeeze(0)?;
    mask_indices(&norm, tau)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_maps_average_heads() -> Result<()> {
        let dev = Device::Cpu;
        // batch 2, heads 2, hw 3, tokens 4
        let data: Vec<f64> = (0..48).map(|x| x as f64).collect();
        let p = Tensor::from_vec(data, (2, 2, 3, 4), &dev)?;
        let m = token_maps(&p, 1, &[2, 0])?;
        assert_eq!(m.dims(), &[2, 3]);
        // Batch 1 starts at 24; head h adds 12h, position s adds 4s, token adds t.
        let got: Vec<Vec<f64>> = m.to_vec2()?;
        let want = |s: f64, t: f64| 24.0 + 6.0 + 4.0 * s + t;
        assert_eq!(got[0], vec![want(0., 2.), want(1., 2.), want(2., 2.)]);
        assert_eq!(got[1], vec![want(0., 0.), want(1., 0.), want(2., 0.)]);
        assert!(token_maps(&p, 2, &[0]).is_err());
        assert!(token_maps(&p, 0, &[4])
            .unwrap_err()
            .to_string()
            .contains('4'));
        Ok(())
    }

    #[test]
    fn normalization_and_mask() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[2.0f64, 4.0, 3.0, 2.1], [5.0, 5.0, 5.0, 5.0]], &dev)?;
        let n: Vec<Vec<f64>> = min_max_normalize(&m)?.to_vec2()?;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(n[0][0], 0.0) && close(n[0][1], 1.0) && close(n[0][2], 0.5));
        assert!(close(n[0][3], 0.05));
        assert_eq!(n[1], vec![0.0; 4]);
        let row0 = Tensor::new(n[0].as_slice(), &dev)?;
        assert_eq!(mask_indices(&row0, 0.1)?, vec![1, 2]);
        assert_eq!(mask_indices(&row0, 0.05)?, vec![1, 2, 3]);
        // A constant map gives an empty mask at τ > 0.
        let row1 = Tensor::new(n[1].as_slice(), &dev)?;
        assert!(mask_indices(&row1, 0.1)?.is_empty());
        Ok(())
    }

    #[test]
    fn subject_mask_from_probs() -> Result<()> {
        let dev = Device::Cpu;
        // One head pair; token 1 peaks at position 2.
        let mut data = vec![0.0f32; 2 * 4 * 3];
        for h in 0..2 {
            for (s, v) in [0.1f32, 0.12, 0.9, 0.5].iter().enumerate() {
                data[h * 12 + s * 3 + 1] = *v;
            }
        }
        let p = Tensor::from_vec(data, (1, 2, 4, 3), &dev)?;
        assert_eq!(subject_mask(&p, 0, 1, 0.1)?, vec![2, 3]);
        Ok(())
    }

    #[test]
    fn normalization_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = [0.3f64, -0.2, 0.9, 0.1, 0.45, 0.2];
        let w = Tensor::new(&[[0.7f64, -1.3, 0.2], [0.5, 1.1, -0.4]], &dev)?;
        let f = |x: &Tensor| -> Result<Tensor> {
            let n = min_max_normalize(&x.reshape((2, 3))?)?;
            Ok((n * &w)?.sum_all()?)
        };
        crate::testutil::check_gradient(&x0, f, 1e-4)
    }
}
