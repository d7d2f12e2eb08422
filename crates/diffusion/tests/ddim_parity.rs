//! DDIM against diffusers' `DDIMScheduler` (fixture: tools/fixtures/sd_pipeline.py).

mod pipeline_support;

use candle_core::DType;
use diffusion::ddim::{Ddim, DdimConfig};
use pipeline_support::*;

fn config() -> DdimConfig {
    weights::read_json(&model_dir().join("scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn fixture_config_is_stable_diffusion_config() {
    assert_eq!(config(), DdimConfig::stable_diffusion());
}

#[test]
fn timesteps_identical_to_diffusers() {
    let exp = expected();
    for n in [50usize, 10, 5] {
        let want: Vec<i64> = exp[&format!("timesteps_{n}")].to_vec1().unwrap();
        let got: Vec<i64> = Ddim::new(&config(), n)
            .unwrap()
            .timesteps()
            .iter()
            .map(|&t| t as i64)
            .collect();
        assert_eq!(got, want, "{n} steps");
    }
    for spacing in ["trailing", "linspace"] {
        let mut c = config();
        c.timestep_spacing = spacing.into();
        let want: Vec<i64> = exp[&format!("timesteps_50_{spacing}")].to_vec1().unwrap();
        let got: Vec<i64> = Ddim::new(&c, 50)
            .unwrap()
            .timesteps()
            .iter()
            .map(|&t| t as i64)
            .collect();
        assert_eq!(got, want, "{spacing}");
    }
}

#[test]
fn alphas_cumprod_match() {
    let want: Vec<f32> = expected()["alphas_cumprod"].to_vec1().unwrap();
    let d = Ddim::new(&config(), 50).unwrap();
    let worst = want
        .iter()
        .zip(d.alphas_cumprod())
        .map(|(w, g)| (*w as f64 - g).abs())
        .fold(0f64, f64::max);
    assert!(worst < 1e-6, "alphas_cumprod max abs diff {worst}");
}

#[test]
fn steps_match_diffusers_for_epsilon_and_v_prediction() {
    let exp = expected();
    let sample = &exp["step_sample"];
    let eps = &exp["step_model_output"];
    for (pred, key) in [("epsilon", "eps"), ("v_prediction", "v")] {
        let mut c = config();
        c.prediction_type = pred.into();
        let d = Ddim::new(&c, 50).unwrap();
        for t in [981usize, 501, 1] {
            let got = d.step(eps, t, sample).unwrap().prev_sample;
            let want = &exp[&format!("step_{key}_t{t}")];
            let err = max_abs_diff(&got, want);
            assert!(err < 1e-5, "{pred} t={t}: {err}");
            assert_eq!(got.dtype(), DType::F32);
        }
    }
}
