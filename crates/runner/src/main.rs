use std::process::ExitCode;

fn main() -> ExitCode {
    // Keep freed tensor buffers in the heap instead of unmapping and re-faulting them (see
    // `layers::allocator`): 25-33% off a UNet pass on the CPU.
    layers::allocator::tune_for_tensors();
    // candle's spin-waiting elementwise pool fights the GEMM threads for the cores
    // (`layers::threads`).
    layers::threads::single_elementwise_pool();
    guidance::inversion::set_progress(runner::progress::inversion_line);
    let args = <runner::cli::Cli as clap::Parser>::parse();
    match runner::cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // Once: each cause of the chain once, even where a message repeats its source.
            eprintln!("error: {}", runner::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
