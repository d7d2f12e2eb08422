use std::process::ExitCode;

fn main() -> ExitCode {
    let args = <runner::cli::Cli as clap::Parser>::parse();
    match runner::cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
