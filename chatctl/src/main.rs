//! `chatctl`: parses arguments, runs the command, maps errors to exit codes.

use std::io::ErrorKind;
use std::process::ExitCode;

use chatctl::ChatctlError;
use chatctl::cli::Cli;
use chatctl::error::exit;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chatctl: cannot start the async runtime: {err}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match runtime.block_on(chatctl::run(cli, &mut out)) {
        Ok(()) => ExitCode::from(exit::OK),
        // A reader that went away (`chatctl ls | head`) is not an error.
        Err(ChatctlError::Output(err)) if err.kind() == ErrorKind::BrokenPipe => {
            ExitCode::from(exit::OK)
        }
        Err(err) => {
            eprintln!("chatctl: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
