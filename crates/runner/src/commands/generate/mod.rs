//! `pnd generate`: one image from a Stable Diffusion model (plain, DreamBooth or Textual
//! Inversion, [`sd`]), from BLIP-Diffusion ([`blip`]) or from IP-Adapter ([`ip_adapter`]), each
//! with or without Pick-and-Draw; and
//! `pnd tiny-model`: write the built-in tiny model (SPEC §1, §6). Both generators read the flags
//! of [`args`] and the helpers of `shared` and `commands::common`; neither knows the other.

pub mod args;
pub mod blip;
pub mod ip_adapter;
pub mod sd;
mod shared;

pub use args::{GenerateArgs, IpAdapterArgs, Method, PickAndDrawArgs, TinyModelArgs};

use anyhow::Context;
use std::process::ExitCode;

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    args.check_cheap()?;
    match args.method {
        Method::StableDiffusion => sd::run(args),
        Method::BlipDiffusion => blip::run(args),
        Method::IpAdapter => ip_adapter::run(args),
    }
}

pub fn run_tiny_model(args: TinyModelArgs) -> anyhow::Result<ExitCode> {
    let spec = tiny::TinySpec::default();
    let scratch = tempfile::tempdir().context("creating a temporary folder")?;
    let tokenizer = crate::demo::find_tokenizer(args.tokenizer.as_deref(), scratch.path())?;
    tiny::write_tiny_model(&args.out, args.seed, &tokenizer, &spec)?;
    if let Some(token) = &args.embedding_token {
        let path = args.out.join("learned_embeds.safetensors");
        tiny::write_tiny_embedding(&path, token, args.seed.wrapping_add(100), &spec)?;
    }
    eprintln!("wrote tiny model to '{}'", args.out.display());
    if let Some(dir) = &args.ip_adapter {
        tiny::write_tiny_ip_adapter(dir, args.seed.wrapping_add(200), &spec)?;
        eprintln!("wrote its tiny IP-Adapter to '{}'", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
