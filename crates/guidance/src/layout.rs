//! Layout drawing (SPEC §7): ℓ_lay = (1/L) Σ_l ‖G(Â_l^gen) − G(Â_l^temp)‖_F, with every word
//! token's map min–max normalized over space and smoothed by a 3×3 Gaussian with reflect padding,
//! and the prompt/template token matching.

use crate::appearance::loss_precision;
use crate::config::Kernel;
use crate::error::{Error, Result};
use crate::maps::min_max_normalize;
use candle_core::Tensor;

/// Normalized 1-D weights of the 3-tap Gaussian; the 2-D kernel is their outer product.
///
/// `Kernel::Aa` is Attend-and-Excite's `GaussianSmoothing`
/// (<https://github.com/yuval-alaluf/Attend-and-Excite/blob/1b67cfc19cd3952e390dbb8047ccd126471567f2/utils/gaussian_smoothing.py#L36-L38>):
/// `exp(−((x − μ)/(2σ))²)`, a product over dimensions, normalized to sum 1; σ = 0.5 gives
/// `[0.2119, 0.5761, 0.2119]`. `Kernel::Textbook` is `exp(−x²/(2σ²))`, normalized.
pub fn gaussian_weights(kernel: Kernel, sigma: f64) -> [f64; 3] {
    let f = |x: f64| match kernel {
        Kernel::Aa => (-(x / (2.0 * sigma)).powi(2)).exp(),
        Kernel::Textbook => (-(x * x) / (2.0 * sigma * sigma)).exp(),
    };
    let w = [f(-1.0), f(0.0), f(1.0)];
    let s: f64 = w.iter().sum();
    [w[0] / s, w[1] / s, w[2] / s]
}

/// Reflect-pads one element on each side of `dim` (PyTorch's `mode="reflect"`: the edge is not
/// repeated), differentiably.
fn reflect_pad1(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let left = x.narrow(dim, 1, 1)?;
    let right = x.narrow(dim, n - 2, 1)?;
    Ok(Tensor::cat(&[&left, x, &right], dim)?)
}

/// 1-D convolution with 3 taps along `dim` after reflect padding.
fn smooth_dim(x: &Tensor, dim: usize, w: [f64; 3]) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let p = reflect_pad1(x, dim)?;
    let a = (p.narrow(dim, 0, n)? * w[0])?;
    let b = (p.narrow(dim, 1, n)? * w[1])?;
    let c = (p.narrow(dim, 2, n)? * w[2])?;
    Ok(((a + b)? + c)?)
}

/// 3×3 Gaussian smoothing with reflect padding, separably (the 2-D kernel is an outer product).
/// A dimension of size 1 (the 1×1 middle block of a tiny image) cannot be reflect-padded and is
/// left unsmoothed.
///
/// # Shapes
/// - `maps`: `[k, h, w]` → `[k, h, w]`
pub fn smooth(maps: &Tensor, kernel: Kernel, sigma: f64) -> Result<Tensor> {
    let (_, h, w) = maps.dims3()?;
    let wts = gaussian_weights(kernel, sigma);
    let mut out = maps.clone();
    if h >= 2 {
        out = smooth_dim(&out, 1, wts)?;
    }
    if w >= 2 {
        out = smooth_dim(&out, 2, wts)?;
    }
    Ok(out)
}

/// Frobenius norm with the subgradient 0 at 0 (as PyTorch's `norm`), where a plain `sqrt` would
/// give `0 · ∞ = NaN`: with identical maps (vanilla SD against its own template) ℓ_lay is 0.
/// `sqrt(s + z) · (1 − z)` with `z = [s = 0]` a constant: `sqrt(s)` and its exact gradient for
/// `s > 0`, 0 with gradient 0 at 0, all on the device (no host copy).
fn frobenius(d: &Tensor) -> Result<Tensor> {
    let s = d.sqr()?.sum_all()?;
    let zero = s.detach().eq(0.0)?.to_dtype(s.dtype())?;
    let keep = zero.affine(-1.0, 1.0)?;
    Ok((s + &zero)?.sqrt()?.mul(&keep)?)
}

/// ‖G(N(gen)) − G(N(temp))‖_F of one layer, N = per-token min–max normalization over space.
///
/// # Shapes
/// - `generated`, `template`: `[k, h, w]` (k matched tokens) → scalar
pub fn layer_distance(
    generated: &Tensor,
    template: &Tensor,
    kernel: Kernel,
    sigma: f64,
) -> Result<Tensor> {
    if generated.dims() != template.dims() || generated.rank() != 3 {
        return Err(Error::Shape {
            what: "generated and template maps",
            expected: format!("equal [k, h, w] shapes, template {:?}", template.dims()),
            got: generated.dims().to_vec(),
        });
    }
    let d =
        (layout_maps(generated, kernel, sigma)? - layout_maps(&template.detach(), kernel, sigma)?)?;
    frobenius(&d)
}

/// What ℓ_lay compares of one layer: `G(N(maps))`, each token's map min–max normalized over
/// space (N) and smoothed by the 3×3 Gaussian (G). `pnd maps` draws these.
///
/// # Shapes
/// - `maps`: `[k, h, w]` → `[k, h, w]`
pub fn layout_maps(maps: &Tensor, kernel: Kernel, sigma: f64) -> Result<Tensor> {
    let (k, h, w) = maps.dims3()?;
    let n = min_max_normalize(&maps.reshape((k, h * w))?)?.reshape((k, h, w))?;
    smooth(&n, kernel, sigma)
}

/// ℓ_lay: the mean of [`layer_distance`] over layers (each `(generated, template)`).
pub fn layout_loss(layers: &[(Tensor, Tensor)], kernel: Kernel, sigma: f64) -> Result<Tensor> {
    if layers.is_empty() {
        return Err(Error::NoLayoutLayers);
    }
    let terms = layers
        .iter()
        .map(|(g, t)| {
            let (g, t) = (loss_precision(g)?, loss_precision(t)?);
            layer_distance(&g, &t, kernel, sigma)
        })
        .collect::<Result<Vec<_>>>()?;
    let l = layers.len() as f64;
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / l)?)
}

/// Reshapes `[k, hw]` maps to `[k, h, w]` for a square attention resolution.
pub fn to_square(maps: &Tensor) -> Result<Tensor> {
    let (k, hw) = maps.dims2()?;
    let side = (hw as f64).sqrt().round() as usize;
    if side * side != hw {
        return Err(Error::Shape {
            what: "attention map (not square)",
            expected: "[k, s·s]".into(),
            got: maps.dims().to_vec(),
        });
    }
    Ok(maps.reshape((k, side, side))?)
}

/// Pairs of sequence positions `(in the personalized prompt, in the template prompt)` of the
/// word tokens, matched by position once the identifier's tokens are removed.
///
/// `personal` and `template` are the word tokens only (start, end and padding excluded);
/// `identifier` is the identifier's token sequence (empty when there is none); its first
/// occurrence in `personal` is removed. Returned positions count the start token, i.e. they index
/// the 77-token sequence the text encoder sees.
pub fn match_tokens(
    personal: &[u32],
    identifier: &[u32],
    template: &[u32],
) -> Result<Vec<(usize, usize)>> {
    let mismatch = || Error::TokenMismatch {
        personal: personal.to_vec(),
        identifier: identifier.to_vec(),
        template: template.to_vec(),
    };
    let mut keep: Vec<usize> = (0..personal.len()).collect();
    if !identifier.is_empty() {
        let at = personal
            .windows(identifier.len())
            .position(|w| w == identifier)
            .ok_or_else(mismatch)?;
        keep.drain(at..at + identifier.len());
    }
    let kept: Vec<u32> = keep.iter().map(|&p| personal[p]).collect();
    if kept.len() != template.len() {
        return Err(mismatch());
    }
    Ok(keep
        .iter()
        .enumerate()
        .map(|(t, &p)| (p + 1, t + 1))
        .collect())
}

/// Word tokens of a prompt (start, end and padding excluded), as [`match_tokens`] takes them.
pub(crate) fn word_ids(tok: &diffusion::tokenizer::ClipTokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text)?;
    let n = enc.len_unpadded();
    Ok(enc.ids[1..n.saturating_sub(1).max(1)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[n, hw]` rows of `maps` at `rows`.
    fn select_rows(maps: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::new(idx.as_slice(), maps.device())?;
        Ok(maps.index_select(&idx, 0)?)
    }
    use crate::testutil::check_gradient;
    use candle_core::{DType, Device};

    #[test]
    fn kernel_weights() {
        let aa = gaussian_weights(Kernel::Aa, 0.5);
        let e = (-1.0f64).exp();
        let want = [
            e / (1.0 + 2.0 * e),
            1.0 / (1.0 + 2.0 * e),
            e / (1.0 + 2.0 * e),
        ];
        for k in 0..3 {
            assert!((aa[k] - want[k]).abs() < 1e-15);
        }
        // The figures SPEC §7 quotes.
        assert!((aa[0] - 0.2119).abs() < 5e-5 && (aa[1] - 0.5761).abs() < 5e-5);
        let tb = gaussian_weights(Kernel::Textbook, 0.5);
        let e2 = (-2.0f64).exp();
        assert!((tb[1] - 1.0 / (1.0 + 2.0 * e2)).abs() < 1e-15);
        assert!((tb[0] - 0.1065).abs() < 5e-5 && (tb[1] - 0.7870).abs() < 5e-5);
        // The textbook kernel at σ equals the A&E kernel at σ/√2.
        let aa2 = gaussian_weights(Kernel::Aa, 0.5 / 2f64.sqrt());
        assert!((aa2[0] - tb[0]).abs() < 1e-15);
    }

    #[test]
    fn smoothing_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        // A delta in the corner of a 3×3 map: reflect padding mirrors it to the far side
        // of the border, so the corner gets w1² + ... computed by hand below.
        let mut m = vec![0.0f64; 9];
        m[0] = 1.0;
        let x = Tensor::from_vec(m, (1, 3, 3), &dev)?;
        let [a, b, _] = gaussian_weights(Kernel::Aa, 0.5);
        let y: Vec<Vec<Vec<f64>>> = smooth(&x, Kernel::Aa, 0.5)?.to_vec3()?;
        // 1-D reflect of [1, 0, 0] → padded [0, 1, 0, 0, 0] → [b, a, 0]
        let one_d = [b, a, 0.0];
        for i in 0..3 {
            for j in 0..3 {
                assert!((y[0][i][j] - one_d[i] * one_d[j]).abs() < 1e-15, "{i},{j}");
            }
        }
        // The centre of a 4×4 delta spreads the full kernel.
        let mut m = vec![0.0f64; 16];
        m[5] = 1.0;
        let x = Tensor::from_vec(m, (1, 4, 4), &dev)?;
        let y: Vec<Vec<Vec<f64>>> = smooth(&x, Kernel::Aa, 0.5)?.to_vec3()?;
        // 1-D: [0, 1, 0, 0] pads to [1, 0, 1, 0, 0, 0] → [2a, b, a, 0].
        assert!((y[0][1][1] - b * b).abs() < 1e-15);
        assert!((y[0][0][1] - 2.0 * a * b).abs() < 1e-15);
        assert!((y[0][0][0] - 4.0 * a * a).abs() < 1e-15);
        assert!((y[0][2][3]).abs() < 1e-15 && (y[0][3][2] - a * 0.0).abs() < 1e-15);
        assert!((y[0][2][2] - a * a).abs() < 1e-15);
        // A constant map stays constant.
        let c = Tensor::ones((2, 3, 5), DType::F64, &dev)?;
        let s: Vec<f64> = smooth(&c, Kernel::Textbook, 0.5)?
            .flatten_all()?
            .to_vec1()?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-15));
        // A single row is smoothed along its length only.
        let row = Tensor::new(&[[[0.0f64, 1.0, 0.0, 0.0]]], &dev)?;
        let s: Vec<f64> = smooth(&row, Kernel::Aa, 0.5)?.flatten_all()?.to_vec1()?;
        assert!((s[0] - 2.0 * a).abs() < 1e-15 && (s[1] - b).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn layout_loss_on_hand_made_maps() -> Result<()> {
        let dev = Device::Cpu;
        // Token 0: a blob at top-left vs bottom-right; token 1: identical maps.
        let mut g = vec![0.0f64; 2 * 16];
        let mut t = vec![0.0f64; 2 * 16];
        g[0] = 2.0; // normalizes to 1
        t[15] = 5.0;
        for k in 0..16 {
            g[16 + k] = k as f64;
            t[16 + k] = 3.0 * k as f64 + 1.0; // same after min–max normalization
        }
        let gt = Tensor::from_vec(g, (2, 4, 4), &dev)?;
        let tt = Tensor::from_vec(t, (2, 4, 4), &dev)?;
        let [a, b, _] = gaussian_weights(Kernel::Aa, 0.5);
        // Smoothed corner delta on a 4×4: 1-D profile [b, a, 0, 0]; the two deltas do not overlap.
        let p = [b, a, 0.0, 0.0];
        let energy: f64 = p.iter().map(|x| x * x).sum::<f64>().powi(2);
        let want = (2.0 * energy).sqrt();
        let got = layer_distance(&gt, &tt, Kernel::Aa, 0.5)?.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Two layers: the mean; an identical layer contributes 0.
        let loss = layout_loss(
            &[(gt.clone(), tt.clone()), (tt.clone(), tt.clone())],
            Kernel::Aa,
            0.5,
        )?;
        assert!((loss.to_scalar::<f64>()? - want / 2.0).abs() < 1e-12);
        assert!(layout_loss(&[], Kernel::Aa, 0.5).is_err());
        assert!(layer_distance(&gt, &tt.narrow(0, 0, 1)?, Kernel::Aa, 0.5).is_err());
        Ok(())
    }

    #[test]
    fn identical_maps_give_zero_loss_and_zero_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::from_vec(
            (0..18).map(|x| ((x * 7) % 5) as f64).collect(),
            (2, 3, 3),
            &dev,
        )?;
        let v = candle_core::Var::from_tensor(&t)?;
        let loss = layer_distance(v.as_tensor(), &t, Kernel::Aa, 0.5)?;
        assert_eq!(loss.to_scalar::<f64>()?, 0.0);
        // No gradient at all, or an all-zero one: both mean a zero update, never NaN.
        if let Some(g) = loss.backward()?.get(v.as_tensor()) {
            let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
            assert!(g.iter().all(|x| *x == 0.0));
        }
        Ok(())
    }

    #[test]
    fn layout_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x0: Vec<f64> = (0..2 * 3 * 4)
            .map(|k| ((k * 37 % 23) as f64) / 23.0 + 0.01 * k as f64)
            .collect();
        let t1 = Tensor::from_vec(
            (0..24).map(|k| ((k * 11 % 17) as f64).sin()).collect(),
            (2, 3, 4),
            &dev,
        )?;
        let t2 = Tensor::from_vec(
            (0..24).map(|k| ((k * 5 % 13) as f64).cos()).collect(),
            (2, 3, 4),
            &dev,
        )?;
        for kernel in [Kernel::Aa, Kernel::Textbook] {
            check_gradient(
                &x0,
                |x| {
                    let g = x.reshape((2, 3, 4))?;
                    let g2 = (g.clone() * 0.5)?.exp()?;
                    layout_loss(&[(g, t1.clone()), (g2, t2.clone())], kernel, 0.5)
                },
                1e-4,
            )?;
        }
        Ok(())
    }

    #[test]
    fn token_matching() -> Result<()> {
        // "a sks dog in the jungle" vs "a dog in the jungle" (made-up ids).
        let personal = [320, 48136, 1929, 530, 518, 9658];
        let template = [320, 1929, 530, 518, 9658];
        let pairs = match_tokens(&personal, &[48136], &template)?;
        assert_eq!(pairs, vec![(1, 1), (3, 2), (4, 3), (5, 4), (6, 5)]);
        // A multi-token identifier; no identifier at all.
        let pairs = match_tokens(&[1, 7, 8, 2], &[7, 8], &[1, 2])?;
        assert_eq!(pairs, vec![(1, 1), (4, 2)]);
        assert_eq!(match_tokens(&[1, 2], &[], &[1, 2])?, vec![(1, 1), (2, 2)]);
        // Missing identifier, or lengths that differ after removal, are errors naming the tokens.
        let err = match_tokens(&[1, 2], &[9], &[1, 2]).unwrap_err();
        assert!(err.to_string().contains("[9]"), "{err}");
        assert!(match_tokens(&[1, 9, 2], &[9], &[1, 2, 3]).is_err());
        Ok(())
    }

    #[test]
    fn to_square_and_select() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::arange(0f64, 32.0, &dev)?.reshape((2, 16))?;
        assert_eq!(to_square(&m)?.dims(), &[2, 4, 4]);
        assert!(to_square(&m.reshape((4, 8))?).is_err());
        let s: Vec<Vec<f64>> = select_rows(&m, &[1])?.to_vec2()?;
        assert_eq!(s[0][0], 16.0);
        Ok(())
    }
}
