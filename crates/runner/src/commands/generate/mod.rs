//! `pnd generate`: one image from a Stable Diffusion model (plain, DreamBooth or Textual
//! Inversion, [`sd`]) or from BLIP-Diffusion ([`blip`]), each with or without Pick-and-Draw; and
//! `pnd tiny-model`: write the built-in tiny model (SPEC §1, §6). Both generators read the flags
//! of [`args`] and the helpers of `shared` and `commands::common`; neither knows the other.

pub mod args;
pub mod blip;
pub mod sd;
mod shared;

pub use args::{GenerateArgs, Method, PickAndDrawArgs, TinyModelArgs};

use anyhow::Context;
use std::process::ExitCode;

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    args.check_cheap()?;
    match args.method {
        Method::StableDiffusion => sd::run(args),
        Method::BlipDiffusion => blip::run(args),
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
    Ok(ExitCode::SUCCESS)
}
