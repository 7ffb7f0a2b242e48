//! `twinfer serve` driven by the official OpenAI Python client: tests/server/openai_clients.py
//! starts this binary and checks chat, completions, embeddings against the numpy reference,
//! concurrent streams against solo runs, a client that disconnects, and typed errors. The client
//! comes from the venv that scripts/fetch-models.sh pins; a missing venv fails the test with the
//! command that makes it. Under an emulator (TWINFER_CLI_RUNNER, the aarch64 build under qemu)
//! only the protocol checks run: the concurrency and overflow checks, where every prompt costs
//! ~20x more there, run natively in the same CI. `TWINFER_SERVE_SOAK=SECONDS` adds the abandoned-connections soak (the
//! long tier runs it for 60 s).
#![cfg(not(target_arch = "wasm32"))]

use std::path::Path;
use std::process::Command;

use twinfer_tests::models::model_dir;

#[test]
fn openai_python_client_against_twinfer_serve() {
    let models = model_dir("smollm2").parent().expect("the model cache").to_path_buf();
    let python = models.join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/fetch-models.sh", python.display());
    let runner = std::env::var("TWINFER_CLI_RUNNER").unwrap_or_default();
    let twinfer = format!("{runner} {}", env!("CARGO_BIN_EXE_twinfer")).trim().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/server/openai_clients.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg("--twinfer").arg(&twinfer).arg("--models").arg(&models);
    if !runner.is_empty() {
        cmd.arg("--emulated");
    }
    if let Ok(seconds) = std::env::var("TWINFER_SERVE_SOAK") {
        cmd.args(["--soak", &seconds]);
    }
    let status = cmd.env("PYTHONDONTWRITEBYTECODE", "1").status().expect("python runs");
    assert!(status.success(), "the OpenAI client checks failed ({status}); their output is above");
}
