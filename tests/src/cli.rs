//! Running the `twinfer` binary from the CLI crate's tests.

use std::process::Command;

/// A command for the binary at `exe`, behind `TWINFER_CLI_RUNNER` (an emulator command, for
/// cross-built binaries) when that is set.
pub fn command(exe: &str) -> Command {
    let runner = std::env::var("TWINFER_CLI_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}
