//! `Runtime`: the attention engines chosen once, a model loaded into them, and the calls the
//! package's JS layer drives: `embed`, `add` + `step` (continuous batching, one batch per call),
//! `cancel`, `metrics`, `info`.
//!
//! Calls that run the model return promises: the WebGPU engine has to give the event loop back
//! while the GPU works. One call runs at a time; the JS layer queues them, and a call made while
//! another runs is refused (`Busy`) rather than interleaved.

// The state stays borrowed while a call awaits the GPU, on purpose: that is what makes a second
// call see `Busy`. Every borrow here is a `try_borrow`, so this can never panic.
#![allow(clippy::await_holding_refcell_ref)]

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use twinfer::cpu::{ActivationCodes, SimdLevel};
use twinfer::engine::{EngineConfig, Event, FinishReason, RequestId, Scheduler};
use twinfer::model::{BertModel, ChatMessage, ChatTemplate, Model, Network, Tokenizer};
use twinfer::{Attention, Backend, BackendInfo, DType, TwinferError};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::errors::{js_error, to_js_error};
use crate::files::ModelFiles;
use crate::install_panic_hook;
use crate::options::{Options, generate_request};

type Result<T> = std::result::Result<T, TwinferError>;

#[wasm_bindgen(typescript_custom_section)]
const TS_RUNTIME: &'static str = r#"
/** One attention engine: what runs, on what, and why. */
export interface EngineReport { backend: "cpu" | "gpu"; device: string; variant: string; reason: string; }
/** What the runtime runs on, and the model it holds. */
export interface RuntimeInfo {
  /** "webgpu" when any phase runs on the GPU, else "wasm". */
  backend: "webgpu" | "wasm";
  reason: string;
  simd: string;
  prefill: EngineReport;
  decode: EngineReport;
  model: null | { kind: "decoder" | "encoder"; description: string };
}
/** What one `step` produced for one request. */
export type StepEvent =
  | { kind: "token"; id: number; tokenId: number; text: string; t: number }
  | { kind: "finished"; id: number; reason: string; detail: string | null; text: string; tokens: number[]; metrics: any };
"#;

#[wasm_bindgen]
extern "C" {
    // Present in browsers, workers and Node: the clock of TTFT, TPOT and ITL.
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
}

fn web_clock() -> f64 {
    performance_now() / 1000.0
}

/// The loaded model.
enum Served {
    Decoder(Box<Scheduler>),
    Encoder { model: Box<BertModel>, tokenizer: Box<Tokenizer> },
}

struct State {
    prefill: Attention,
    decode: Attention,
    level: SimdLevel,
    reason: String,
    served: Option<(Served, String)>,
    /// The decoder's chat template and tokenizer, when it has a template.
    chat: Option<(ChatTemplate, Arc<Tokenizer>)>,
}

/// The engines and the model; see the module docs.
#[wasm_bindgen]
pub struct Runtime {
    state: Rc<RefCell<State>>,
    /// The GPU engine as opened (it shares the device with the model's engines), reachable while
    /// a step holds the state: the test hooks destroy its device mid-step.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    gpu_handle: Option<Attention>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

#[wasm_bindgen]
impl Runtime {
    /// Chooses the engines: `"wasm"` (the SIMD CPU engine), `"webgpu"` (the WGSL engine, after
    /// its self-test) or `"auto"` (WebGPU when it passes, else wasm, with the reason).
    #[wasm_bindgen(unchecked_return_type = "Promise<Runtime>")]
    pub fn open(backend: String) -> js_sys::Promise {
        install_panic_hook();
        future_to_promise(async move {
            let (prefill, decode, reason) = open_engines(&backend).await.map_err(to_js_error)?;
            let level = SimdLevel::detect();
            let gpu_handle = prefill.is_gpu().then(|| prefill.clone());
            let state = State { prefill, decode, level, reason, served: None, chat: None };
            Ok(Runtime { state: Rc::new(RefCell::new(state)), gpu_handle }.into())
        })
    }

    /// Loads a model from `files` (which are emptied: their bytes move into the model).
    /// `options`: `{ pageSize, kvMemoryBytes, kvDtype: "f16" | "f32", maxBatchTokens, maxRunning, prefixCache,
    /// quantize, activations: "int16" | "int8" }`.
    /// On WebGPU the weights go to the GPU here, with `on_upload(bytesDone, bytesTotal)` after
    /// each matrix.
    pub fn load(
        &self,
        files: &mut ModelFiles,
        options: JsValue,
        #[wasm_bindgen(unchecked_param_type = "(done: number, total: number) => void")] on_upload: js_sys::Function,
    ) -> std::result::Result<(), js_sys::Error> {
        let mut state = self.state.try_borrow_mut().map_err(|_| busy())?;
        let cpu_decode = state.decode.info().backend == "cpu";
        let config = engine_config(&options, cpu_decode).map_err(to_js_error)?;
        // Drop the old model first: two models at once may not fit.
        state.served = None;
        state.chat = None;
        let (source, streamed) = files.take_source().map_err(to_js_error)?;
        let mut model = match streamed {
            Some(tensors) => Model::load_streamed(source, tensors),
            None => Model::load(source),
        }
        .map_err(to_js_error)?;
        // Streamed tensors are quantized already; this converts what is still float (a GGUF
        // file's float matrices, or a model handed over without `quantizeTo`).
        if let Network::Decoder(m) = &mut model.network {
            if let Some(format) = config.quantize {
                m.quantize(format).map_err(to_js_error)?;
            }
            m.set_activations(config.activations);
        }
        let description = model.describe();
        let chat = model.chat().map_err(to_js_error)?;
        if let Some(gpu) = state.prefill.gpu_engine() {
            let progress = |done: usize, total: usize| {
                let _ =
                    on_upload.call2(&JsValue::NULL, &JsValue::from_f64(done as f64), &JsValue::from_f64(total as f64));
            };
            let uploaded = match &model.network {
                Network::Encoder(m) => m.upload_weights(gpu, progress),
                Network::Decoder(m) => m.upload_weights(gpu, progress),
            };
            match uploaded {
                // The first step meets the lost device too, and moves to the CPU engine then.
                Ok(()) | Err(TwinferError::DeviceLost(_)) => {}
                Err(e) => return Err(to_js_error(e)),
            }
        }
        let served = match model.network {
            Network::Encoder(m) => Served::Encoder { model: Box::new(m), tokenizer: Box::new(model.tokenizer) },
            Network::Decoder(m) => Served::Decoder(Box::new({
                let tokenizer = Arc::new(model.tokenizer);
                state.chat = chat.map(|c| (c, tokenizer.clone()));
                Scheduler::new(
                    Arc::new(m),
                    Some(tokenizer),
                    state.level,
                    state.prefill.clone(),
                    state.decode.clone(),
                    config,
                )
                .map_err(to_js_error)?
            })),
        };
        state.served = Some((served, description));
        Ok(())
    }

    /// What runs where, and the model (see `RuntimeInfo`).
    #[wasm_bindgen(unchecked_return_type = "RuntimeInfo")]
    pub fn info(&self) -> std::result::Result<JsValue, js_sys::Error> {
        let state = self.state.try_borrow().map_err(|_| busy())?;
        // A scheduler that lost its GPU runs on the CPU engines it switched to: report those.
        let (prefill, decode, reason) = match &state.served {
            Some((Served::Decoder(s), _)) => (
                s.prefill_attention().info(),
                s.decode_attention().info(),
                s.fallback().map_or(state.reason.clone(), |f| format!("{f} (at startup: {})", state.reason)),
            ),
            _ => (state.prefill.info(), state.decode.info(), state.reason.clone()),
        };
        let gpu = prefill.backend == "gpu" || decode.backend == "gpu";
        let model = match &state.served {
            None => serde_json::Value::Null,
            Some((served, description)) => serde_json::json!({
                "kind": if matches!(served, Served::Decoder(_)) { "decoder" } else { "encoder" },
                "description": description,
                "chat": state.chat.is_some(),
            }),
        };
        let info = serde_json::json!({
            "backend": if gpu { "webgpu" } else { "wasm" },
            "reason": reason,
            "simd": state.level.name(),
            "prefill": engine_report(prefill),
            "decode": engine_report(decode),
            "model": model,
            // The module's linear memory: it only grows, so this is the peak so far.
            "wasmMemoryBytes": wasm_memory_bytes(),
        });
        to_js(&info)
    }

    /// One L2-normalised embedding per text (encoder models). A GPU lost on the way moves the
    /// encoder to the CPU engine, which then computes the whole batch.
    #[wasm_bindgen(unchecked_return_type = "Promise<Float32Array[]>")]
    pub fn embed(&self, texts: Vec<String>) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let result = {
                let s = state.try_borrow().map_err(|_| busy())?;
                let (model, tokenizer) = encoder(&s)?;
                let ids =
                    texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<Vec<_>>>().map_err(to_js_error)?;
                let result = model.embed_async(s.level, &s.prefill, &ids).await;
                (result, ids)
            };
            let embeddings = match result {
                (Err(TwinferError::DeviceLost(why)), ids) => {
                    let mut s = state.try_borrow_mut().map_err(|_| busy())?;
                    let cpu = Attention::cpu(s.level);
                    s.reason = format!("the GPU device was lost ({why}); embeddings run on the CPU with {}", s.level);
                    s.prefill = cpu.clone();
                    s.decode = cpu;
                    let (model, _) = encoder(&s)?;
                    model.embed_async(s.level, &s.prefill, &ids).await
                }
                (other, _) => other,
            }
            .map_err(to_js_error)?;
            let out = js_sys::Array::new();
            for e in embeddings {
                out.push(&js_sys::Float32Array::from(&e[..]));
            }
            Ok(out.into())
        })
    }

    /// Queues a generation request; it starts at the next `step`. `prompt`: text or token ids.
    /// `options`: `{ maxTokens, temperature, topK, topP, repetitionPenalty, seed, stop,
    /// stopTokenIds, ignoreEos }`. `arrivedAt`: when the caller asked, in seconds of
    /// `performance.now()` (default: now); TTFT counts from it, so time spent queued behind a
    /// running step is measured. Returns the request's id.
    pub fn add(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string | number[] | Uint32Array")] prompt: JsValue,
        options: JsValue,
        #[wasm_bindgen(js_name = arrivedAt)] arrived_at: Option<f64>,
    ) -> std::result::Result<u32, js_sys::Error> {
        let mut state = self.state.try_borrow_mut().map_err(|_| busy())?;
        let scheduler = decoder(&mut state)?;
        let request = generate_request(&prompt, &options).map_err(to_js_error)?;
        let arrived = arrived_at.filter(|t| t.is_finite()).unwrap_or_else(web_clock);
        let RequestId(id) = scheduler.add_arrived(request, arrived).map_err(to_js_error)?;
        // Ids count requests; four billion of them outlast any page.
        Ok(id as u32)
    }

    /// The token ids of `messages` rendered by the model's chat template, ending where the
    /// assistant's answer begins (no special tokens added: the template places them).
    #[wasm_bindgen(js_name = chatTokens)]
    pub fn chat_tokens(
        &self,
        #[wasm_bindgen(unchecked_param_type = "{ role: string; content: string }[]")] messages: JsValue,
    ) -> std::result::Result<Vec<u32>, js_sys::Error> {
        let state = self.state.try_borrow().map_err(|_| busy())?;
        let Some((template, tokenizer)) = &state.chat else {
            return Err(to_js_error(TwinferError::ChatTemplate("the loaded model has no chat template".into())));
        };
        let messages = chat_messages(&messages).map_err(to_js_error)?;
        let text = template.render(&messages, true).map_err(to_js_error)?;
        tokenizer.encode(&text, false).map_err(to_js_error)
    }

    /// Asks a request to stop; its `finished` event (reason `cancelled`) comes with the next step.
    pub fn cancel(&self, id: u32) -> std::result::Result<bool, js_sys::Error> {
        let mut state = self.state.try_borrow_mut().map_err(|_| busy())?;
        Ok(decoder(&mut state)?.cancel(RequestId(id as u64)))
    }

    /// Whether any request is queued or running.
    #[wasm_bindgen(js_name = hasWork)]
    pub fn has_work(&self) -> bool {
        match self.state.try_borrow() {
            Ok(s) => matches!(&s.served, Some((Served::Decoder(sch), _)) if sch.has_work()),
            // A step is running: there is work.
            Err(_) => true,
        }
    }

    /// Runs one batch (prompt chunks plus one decode token per running request).
    #[wasm_bindgen(unchecked_return_type = "Promise<StepEvent[]>")]
    pub fn step(&self) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let mut state = state.try_borrow_mut().map_err(|_| busy())?;
            let events = decoder(&mut state)?.step_async().await.map_err(to_js_error)?;
            let out = js_sys::Array::new();
            for e in &events {
                out.push(&to_js(&event_json(e))?);
            }
            Ok(out.into())
        })
    }

    /// TTFT / TPOT / ITL / TPS over the requests finished so far (the core's `RunMetrics` as
    /// JSON, times in seconds); `reset` starts a new window.
    pub fn metrics(&self, reset: bool) -> std::result::Result<JsValue, js_sys::Error> {
        let mut state = self.state.try_borrow_mut().map_err(|_| busy())?;
        let scheduler = decoder(&mut state)?;
        let m = scheduler.run_metrics();
        if reset {
            scheduler.reset_metrics();
        }
        to_js(&m.to_json())
    }
}

/// Opens the attention engines for `backend` with the reason for the choice. In a browser,
/// `auto` takes WebGPU whenever an adapter passes the self-test (a software one included: the page
/// asked for the GPU path where there is one); the reason says which adapter and why not.
async fn open_engines(backend: &str) -> Result<(Attention, Attention, String)> {
    let (attention, reason) = match backend {
        "wasm" => {
            let a = Attention::new_async(Backend::Cpu).await?;
            let reason = format!("wasm requested; {}", a.info().reason);
            (a, reason)
        }
        "webgpu" => {
            let a = Attention::new_async(Backend::Gpu).await?;
            let reason = format!("webgpu requested; {}", a.info().reason);
            (a, reason)
        }
        "auto" => match Attention::new_async(Backend::Gpu).await {
            Ok(a) => {
                let reason = format!("auto: WebGPU {}", a.info().reason.trim_start_matches("GPU requested; "));
                (a, reason)
            }
            Err(e) => {
                let a = Attention::new_async(Backend::Cpu).await?;
                let reason = format!("auto: no usable WebGPU ({e}), so wasm SIMD; {}", a.info().reason);
                (a, reason)
            }
        },
        other => {
            return Err(TwinferError::InvalidParameter(format!("unknown backend {other:?} (auto, webgpu, wasm)")));
        }
    };
    Ok((attention.clone(), attention, reason))
}

/// The engine settings from `options`. The KV cache defaults to f32 when decode runs on the wasm
/// engine: simd128 has no f16 conversion instruction, and widening in registers made the decode
/// kernel about 2x slower than reading f32 (measured with `web/bench`); GPUs read f16.
fn engine_config(options: &JsValue, cpu_decode: bool) -> Result<EngineConfig> {
    let o = Options::new(options, "options")?;
    let d = EngineConfig::default();
    let kv_dtype = match o.string("kvDtype")?.as_deref() {
        None if cpu_decode => DType::F32,
        None | Some("f16") => DType::F16,
        Some("f32") => DType::F32,
        // A quarter of f32's bytes on the wasm engine; a GPU runs such a cache op by op.
        Some("q8") => DType::Q8,
        Some(other) => {
            return Err(TwinferError::InvalidParameter(format!("options.kvDtype {other:?}: f16, f32 or q8")));
        }
    };
    Ok(EngineConfig {
        page_size: o.count("pageSize", 4096.0)?.unwrap_or(d.page_size),
        // A browser tab is not a server: a smaller pool than the native default.
        kv_memory_bytes: o.count("kvMemoryBytes", (1u64 << 31) as f64)?.unwrap_or(128 << 20),
        kv_dtype,
        max_batch_tokens: o.count("maxBatchTokens", 1e6)?.unwrap_or(256),
        max_running: o.count("maxRunning", 1e6)?.unwrap_or(d.max_running),
        // A tab mostly chats: keep a few finished turns for the next one's prompt.
        prefix_cache_sequences: o.count("prefixCache", 1e6)?.unwrap_or(4),
        clock: Some(web_clock),
        quantize: o
            .string("quantize")?
            .as_deref()
            .map(|n| twinfer::quant::QuantFormat::parse(n).map(Into::into))
            .transpose()?,
        activations: match o.string("activations")? {
            Some(name) => ActivationCodes::parse(&name)
                .map_err(|_| TwinferError::InvalidParameter(format!("options.activations {name:?}: int16 or int8")))?,
            None => d.activations,
        },
        ..d
    })
}

fn encoder(state: &State) -> std::result::Result<(&BertModel, &Tokenizer), js_sys::Error> {
    match &state.served {
        Some((Served::Encoder { model, tokenizer }, _)) => Ok((model, tokenizer)),
        _ => Err(not_loaded("an encoder (embeddings)")),
    }
}

fn decoder(state: &mut State) -> std::result::Result<&mut Scheduler, js_sys::Error> {
    match &mut state.served {
        Some((Served::Decoder(s), _)) => Ok(s),
        _ => Err(not_loaded("a decoder (generation)")),
    }
}

fn not_loaded(what: &str) -> js_sys::Error {
    js_error("InvalidParameter", &format!("this call needs {what} model loaded"))
}

fn busy() -> js_sys::Error {
    js_error("Busy", "another call on this engine is still running; await it first")
}

fn engine_report(i: &BackendInfo) -> serde_json::Value {
    serde_json::json!({"backend": i.backend, "device": i.device, "variant": i.variant, "threads": i.threads, "reason": i.reason})
}

fn event_json(e: &Event) -> serde_json::Value {
    match e {
        Event::Token { request, token, text, t } => {
            serde_json::json!({"kind": "token", "id": request.0, "tokenId": token, "text": text, "t": t})
        }
        Event::Finished { request, reason, text, tokens, metrics } => {
            let detail = match reason {
                FinishReason::Failed(why) => Some(why.clone()),
                FinishReason::StopString(s) => Some(s.clone()),
                FinishReason::StopToken(t) => Some(t.to_string()),
                _ => None,
            };
            serde_json::json!({"kind": "finished", "id": request.0, "reason": reason.as_str(), "detail": detail,
                               "text": text, "tokens": tokens, "metrics": metrics.to_json()})
        }
    }
}

/// A JSON value as a JS value (through `JSON.parse`: plain objects, no classes).
fn to_js(v: &serde_json::Value) -> std::result::Result<JsValue, js_sys::Error> {
    js_sys::JSON::parse(&v.to_string()).map_err(|_| js_error("Other", "JSON round trip failed"))
}

/// `[{ role, content }]` from JS.
fn chat_messages(value: &JsValue) -> twinfer::Result<Vec<ChatMessage>> {
    let bad = |what: &str| TwinferError::InvalidParameter(format!("messages: {what}"));
    let array: &js_sys::Array = value.dyn_ref().ok_or_else(|| bad("expected an array of { role, content }"))?;
    array
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| {
                js_sys::Reflect::get(&m, &JsValue::from_str(name))
                    .ok()
                    .and_then(|v| v.as_string())
                    .ok_or_else(|| bad(&format!("message {i} has no string {name}")))
            };
            Ok(ChatMessage::new(field("role")?, field("content")?))
        })
        .collect()
}

/// Test hooks, compiled in only with the `test-hooks` feature (the package's own tests).
#[cfg(feature = "test-hooks")]
#[wasm_bindgen]
impl Runtime {
    /// Destroys the GPU device under this runtime, as a browser reclaiming the GPU would; for
    /// tests of the CPU fallback. False (nothing done) on the wasm engine.
    #[wasm_bindgen(js_name = loseDeviceForTest)]
    pub fn lose_device_for_test(&self) -> bool {
        match self.state.try_borrow() {
            Ok(s) => match &s.served {
                Some((Served::Decoder(sch), _)) => sch.decode_attention().lose_device_for_test(),
                _ => s.prefill.lose_device_for_test(),
            },
            // A step is awaiting the GPU: destroy the device under it, which is the point.
            Err(_) => self.gpu_handle.as_ref().is_some_and(|a| a.lose_device_for_test()),
        }
    }
}

/// Bytes of this module's linear memory.
#[cfg(target_arch = "wasm32")]
fn wasm_memory_bytes() -> usize {
    core::arch::wasm32::memory_size(0) * 65536
}

/// Off wasm32 the bindings are only type-checked: there is no linear memory to report.
#[cfg(not(target_arch = "wasm32"))]
fn wasm_memory_bytes() -> usize {
    0
}
