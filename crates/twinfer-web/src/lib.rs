//! JavaScript bindings of twinfer: the engine of the `twinfer` npm package, whose JS layer
//! (`web/src/`) gives it the documented API.
//!
//! - [`runtime`]: `Runtime`, a loaded model served by the prefill and decode engines: `embed`,
//!   continuous-batching generation driven one `step` at a time, metrics.
//! - [`files`]: `ModelFiles`, a model folder's files streamed into wasm memory chunk by chunk.
//! - [`kernels`]: the attention calls on their own (`decode`, `prefill`) and `info`.
//!
//! Bindings only: every call goes through the core crate, which validates its inputs and reports
//! bad ones as a `TwinferError`; [`errors`] turns it into a JS `Error` with a `code`.
//!
//! Panics: wasm32 builds abort on panic, so a panic cannot be caught and turned into an exception.
//! Instead every input is checked before any kernel runs, so no JS input can reach a panic. Should
//! one happen anyway (a bug), the panic hook prints the message with `console.error`, the call
//! throws `RuntimeError: unreachable`, and the JS layer marks the module as unusable.

// The threaded build compiles the GPU paths but never opens a device (the core crate refuses to in
// that build), so what holds wgpu handles, neither Send nor Sync there, is never shared.
#![cfg_attr(target_feature = "atomics", allow(clippy::arc_with_non_send_sync))]

pub mod bench;
pub mod errors;
pub mod files;
pub mod kernels;
mod options;
pub mod runtime;

use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TS_INFO: &'static str = r#"
/** What runs, on what, and why. */
export interface TwinferInfo {
  /** Always "cpu" for the kernel calls. */
  backend: "cpu" | "gpu";
  /** SIMD level of the CPU kernels: "simd128" in the published build, "scalar" without it. */
  simd: string;
  /** Every SIMD level this build can run, scalar first. */
  simdAvailable: string[];
  /** Worker threads of the CPU engine (more than 1 only in the threaded wasm build). */
  threads: number;
  /** Why this backend and level were chosen. */
  reason: string;
  /** The device the kernels run on. */
  device: string;
  /** Version of the twinfer crate inside. */
  version: string;
}
"#;

/// Which backend runs the kernel calls, on what, and why, as a plain object (see `TwinferInfo`).
#[wasm_bindgen(unchecked_return_type = "TwinferInfo")]
pub fn info() -> Result<JsValue, js_sys::Error> {
    let attention = kernels::engine().map_err(errors::to_js_error)?;
    let i = attention.info();
    let simd_available = js_sys::Array::new();
    for level in twinfer::cpu::SimdLevel::available() {
        simd_available.push(&JsValue::from_str(level.name()));
    }
    let obj = js_sys::Object::new();
    let set = |key: &str, value: &JsValue| js_sys::Reflect::set(&obj, &JsValue::from_str(key), value).map(|_| ());
    set("backend", &JsValue::from_str(i.backend))?;
    set("simd", &JsValue::from_str(&i.variant))?;
    set("simdAvailable", &simd_available)?;
    set("threads", &JsValue::from_f64(i.threads as f64))?;
    set("reason", &JsValue::from_str(&i.reason))?;
    set("device", &JsValue::from_str(&i.device))?;
    set("version", &JsValue::from_str(twinfer_version()))?;
    Ok(obj.into())
}

/// Whether this is the threaded build (shared memory; the CPU engine only, on a pool of Web
/// Workers that the JS layer starts).
#[wasm_bindgen(js_name = isThreadedBuild)]
pub fn is_threaded_build() -> bool {
    cfg!(target_feature = "atomics")
}

/// Sizes the CPU pool, the calling thread included, before the first model call. The threaded
/// build then runs each parallel region on this thread and `threads - 1` workers that call
/// [`thread_worker_loop`]; the single-threaded builds accept only 1.
#[wasm_bindgen(js_name = setThreads)]
pub fn set_threads(threads: usize) -> Result<(), js_sys::Error> {
    #[cfg(target_feature = "atomics")]
    {
        // Before any worker runs a task: its panics must reach this thread (see the hook).
        install_panic_hook();
        twinfer::cpu::set_wasm_threads(threads).map_err(errors::to_js_error)
    }
    #[cfg(not(target_feature = "atomics"))]
    match threads {
        1 => Ok(()),
        _ => Err(errors::to_js_error(twinfer::TwinferError::InvalidParameter(format!(
            "{threads} threads asked of the single-threaded build"
        )))),
    }
}

/// The body of one CPU pool worker in the threaded build: never returns. The single-threaded
/// builds throw.
#[wasm_bindgen(js_name = threadWorkerLoop)]
pub fn thread_worker_loop() -> Result<(), js_sys::Error> {
    #[cfg(target_feature = "atomics")]
    twinfer::cpu::serve_wasm_worker();
    #[cfg(not(target_feature = "atomics"))]
    Err(errors::to_js_error(twinfer::TwinferError::InvalidParameter(
        "threadWorkerLoop needs the threaded build".into(),
    )))
}

fn twinfer_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str);
}

/// Prints a panic's message with `console.error` before the module traps (see the crate docs).
pub(crate) fn install_panic_hook() {
    #[cfg(target_arch = "wasm32")]
    {
        use std::sync::Once;
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|panic| {
                // A pool worker's panic must also stop the thread that waits for its task.
                #[cfg(target_feature = "atomics")]
                twinfer::cpu::note_wasm_panic();
                console_error(&format!(
                    "twinfer: {panic}\nThis is a bug in twinfer: the call threw `RuntimeError: unreachable` \
                     and this engine cannot be used any more; create a new one."
                ));
            }))
        });
    }
}

/// Panics on a CPU pool worker of the threaded build, so the tests can check that the call
/// throws rather than waiting forever for the worker's task.
#[cfg(all(feature = "test-hooks", target_feature = "atomics"))]
#[doc(hidden)]
#[wasm_bindgen(js_name = __panicInPoolForTest)]
pub fn panic_in_pool_for_test() {
    install_panic_hook();
    twinfer::cpu::panic_on_a_pool_worker_for_test();
}

/// Panics on purpose, so the tests can check that a Rust panic reaches JS as the package's
/// `EngineCrashedError` (and that the instance then refuses calls) rather than a bare trap.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[wasm_bindgen(js_name = __panicForTest)]
pub fn panic_for_test() {
    install_panic_hook();
    panic!("a deliberate panic from __panicForTest");
}
