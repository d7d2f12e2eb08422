//! Pick-and-Draw (Lv, Xiao, Li, ACM MM 2024; SPEC §7): training-free appearance picking and
//! layout drawing guidance for personalized Stable Diffusion.
//!
//! - [`maps`]: head-averaged cross-attention maps, min–max normalization, subject masks;
//! - [`appearance`]: UREMD, exact EMD ([`ot`]) and ℓ_app over the selected layers;
//! - [`layout`]: the 3×3 Gaussian, ℓ_lay and prompt/template token matching;
//! - [`capture`]: the UNet hook that keeps what the losses need; [`guide`]: the loss at a latent
//!   and the guided sampler;
//! - [`inversion`]: null-text inversion of the reference; [`palette`]: the reference features
//!   taken from its replay; [`store`]: their files; [`cache`]: the on-disk caches;
//! - [`pipeline`] and [`blip`]: one guided image end to end;
//! - [`inspect`]: what the losses see at one step (the maps, masks and smoothed maps of Fig. 3);
//! - [`config`]: every setting with the paper's default; [`trace`]: the JSON-lines trace;
//! - [`readback`]: the device→host copies of a guided step, counted.

pub mod appearance;
pub mod blip;
pub mod cache;
pub mod capture;
pub mod config;
pub mod error;
pub mod guide;
pub mod inspect;
pub mod inversion;
pub mod layout;
pub mod maps;
pub mod ot;
pub mod palette;
pub mod pipeline;
pub mod readback;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod trace;

pub use config::{Components, Distance, GuidanceConfig, Kernel};
pub use error::{Error, Result};
