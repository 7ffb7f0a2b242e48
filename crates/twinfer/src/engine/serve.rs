//! [`Engine`]: a model folder loaded and served. Decoders run the continuous-batching
//! [`Scheduler`] on a worker thread and stream tokens back per request; encoders embed texts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::backend::{Attention, BackendInfo};
use crate::cpu::SimdLevel;
use crate::engine::config::{EngineConfig, default_clock};
use crate::engine::metrics::RunMetrics;
use crate::engine::request::{Event, FinishReason, GenerateRequest, RequestId};
use crate::engine::scheduler::{Scheduler, StepCost};
use crate::error::{Result, TwinferError};
use crate::model::{BertModel, ChatMessage, ChatTemplate, Model, ModelSource, Network, Tokenizer};

enum Command {
    /// A request, the time it arrived (the engine's clock), where its id and events go.
    Generate(Box<GenerateRequest>, f64, Sender<Result<RequestId>>, EventSink),
    Cancel(RequestId),
    Metrics(Sender<RunMetrics>, bool),
    Stats(Sender<EngineStats>),
    Predict(Vec<u32>, Sender<Option<f64>>),
    Shutdown,
}

/// Receives one request's events on the engine thread, in order, ending with
/// [`Event::Finished`]. It must not block: the engine thread runs every request. Returning `false`
/// says that nobody listens any more, and the request is cancelled (its pages freed).
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// What the engine holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineStats {
    /// Requests with KV pages (running or about to run).
    pub running: usize,
    /// Requests queued or preempted, holding no pages.
    pub waiting: usize,
    /// KV pages in the pool (per layer).
    pub kv_pages_total: usize,
    /// KV pages no sequence holds.
    pub kv_pages_free: usize,
    /// Tokens per KV page.
    pub page_size: usize,
    /// Prompt tokens still to compute, queued requests' included.
    pub pending_prompt_tokens: usize,
    /// The measured step-time model.
    pub step_cost: StepCost,
}

impl EngineStats {
    /// Whether the free pages could not hold `tokens` more (a new request would wait or preempt).
    pub fn kv_full_for(&self, tokens: usize) -> bool {
        self.kv_pages_free * self.page_size.max(1) < tokens
    }
}

enum Served {
    Decoder { commands: Sender<Command>, worker: Option<JoinHandle<()>>, tokenizer: Arc<Tokenizer> },
    Encoder { model: Box<BertModel>, tokenizer: Arc<Tokenizer>, level: SimdLevel, attention: Attention },
}

/// A loaded model ready to serve requests.
pub struct Engine {
    served: Served,
    description: String,
    prefill_info: BackendInfo,
    decode_info: BackendInfo,
    level: SimdLevel,
    residency: String,
    chat: Option<ChatTemplate>,
    /// The scheduler's clock: a request's times count from its `generate` call.
    clock: fn() -> f64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("model", &self.description).field("prefill", &self.prefill_info).finish()
    }
}

/// The tokens of one request as they come, ending with [`Event::Finished`]. Dropping it before
/// the end cancels the request and frees its pages.
#[derive(Debug)]
pub struct TokenStream {
    id: RequestId,
    events: Receiver<Event>,
    commands: Sender<Command>,
    done: bool,
}

impl TokenStream {
    /// The request this stream belongs to.
    pub fn id(&self) -> RequestId {
        self.id
    }
    /// Stops the request; the stream still ends with its `Finished` event.
    pub fn cancel(&self) {
        let _ = self.commands.send(Command::Cancel(self.id));
    }
    /// A handle that can cancel from another thread (a Ctrl-C handler).
    pub fn canceller(&self) -> impl Fn() + Send + Sync + 'static {
        let (commands, id) = (std::sync::Mutex::new(self.commands.clone()), self.id);
        move || {
            if let Ok(c) = commands.lock() {
                let _ = c.send(Command::Cancel(id));
            }
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}

impl Iterator for TokenStream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = self.events.recv().ok();
        self.done = matches!(e, None | Some(Event::Finished { .. }));
        e
    }
}

impl Engine {
    /// Loads a Hugging Face model folder.
    pub fn new(model_dir: impl AsRef<Path>, config: EngineConfig) -> Result<Self> {
        Self::from_source(ModelSource::dir(model_dir.as_ref()), config)
    }

    /// Loads a model from `source` (a folder, a GGUF file or files in memory) and starts the engine.
    pub fn from_source(source: ModelSource, config: EngineConfig) -> Result<Self> {
        let model = Model::load(source)?;
        Self::from_model(model, config)
    }

    /// Starts the engine on a loaded model: a decoder gets a scheduler on its own thread; an
    /// encoder runs on the calling thread.
    pub fn from_model(model: Model, config: EngineConfig) -> Result<Self> {
        let description = model.describe();
        let clock = config.clock.unwrap_or(default_clock);
        let chat = model.chat()?;
        let level = match config.simd {
            Some(l) => l,
            None => match std::env::var("TWINFER_SIMD").ok().filter(|v| !v.is_empty()) {
                Some(name) => SimdLevel::by_name(&name).ok_or_else(|| {
                    TwinferError::InvalidParameter(format!("TWINFER_SIMD={name} is not available here"))
                })?,
                None => SimdLevel::detect(),
            },
        };
        let prefill = Attention::with_simd(config.prefill_backend, config.simd)?;
        let decode = Attention::with_simd(config.decode_backend, config.simd)?;
        let (prefill_info, decode_info) = (prefill.info().clone(), decode.info().clone());
        let residency;
        let served = match model.network {
            Network::Encoder(m) => {
                residency = m.residency(&prefill);
                Served::Encoder { model: Box::new(m), tokenizer: Arc::new(model.tokenizer), level, attention: prefill }
            }
            Network::Decoder(mut m) => {
                if let Some(format) = config.quantize {
                    m.quantize(format)?;
                }
                m.set_activations(config.activations);
                let tokenizer = Arc::new(model.tokenizer);
                let scheduler = Scheduler::new(Arc::new(m), Some(tokenizer.clone()), level, prefill, decode, config)?;
                residency = scheduler.residency().to_string();
                let (commands, rx) = channel();
                let worker = std::thread::Builder::new()
                    .name("twinfer-engine".into())
                    .spawn(move || serve(scheduler, rx))
                    .map_err(|e| TwinferError::InvalidParameter(format!("cannot start the engine thread: {e}")))?;
                Served::Decoder { commands, worker: Some(worker), tokenizer }
            }
        };
        Ok(Self { served, description, prefill_info, decode_info, level, residency, chat, clock })
    }

    /// One line on the model: architecture, sizes and weight formats.
    pub fn description(&self) -> &str {
        &self.description
    }
    /// Which attention engines run prefill and decode, and why.
    pub fn backends(&self) -> (&BackendInfo, &BackendInfo) {
        (&self.prefill_info, &self.decode_info)
    }
    /// Where the forward pass runs: resident on the GPU (one readback per step) or op by op,
    /// and why (at startup; a lost GPU moves it to the CPU later).
    pub fn residency(&self) -> &str {
        &self.residency
    }
    /// The CPU instruction set of the projections.
    pub fn simd_level(&self) -> SimdLevel {
        self.level
    }
    /// Whether the model generates text (a decoder) rather than embedding it (an encoder).
    pub fn is_decoder(&self) -> bool {
        matches!(self.served, Served::Decoder { .. })
    }
    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        match &self.served {
            Served::Decoder { tokenizer, .. } => tokenizer,
            Served::Encoder { tokenizer, .. } => tokenizer,
        }
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// A request for the assistant's next turn in `messages`: the chat template renders them
    /// (ending where the answer begins) and the text is tokenized as is, without adding special
    /// tokens (the template places them, as Hugging Face's `apply_chat_template` does).
    /// Generation ends at the model's end-of-turn token, its EOS.
    pub fn chat_request(&self, messages: &[ChatMessage]) -> Result<GenerateRequest> {
        let template =
            self.chat.as_ref().ok_or_else(|| TwinferError::ChatTemplate("the model has no chat template".into()))?;
        let text = template.render(messages, true)?;
        Ok(GenerateRequest::tokens(self.tokenizer().encode(&text, false)?))
    }

    /// Submits a request; its tokens stream back as they are generated.
    pub fn generate(&self, request: GenerateRequest) -> Result<TokenStream> {
        let commands = self.commands()?.clone();
        let (ev_tx, ev_rx) = channel();
        let id = self.generate_with(request, Box::new(move |e| ev_tx.send(e).is_ok()))?;
        Ok(TokenStream { id, events: ev_rx, commands, done: false })
    }

    /// Submits a request whose events go to `sink` (for callers with their own event loop, such
    /// as an async server). Blocks until the engine thread has accepted it: at most one step.
    pub fn generate_with(&self, request: GenerateRequest, sink: EventSink) -> Result<RequestId> {
        let commands = self.commands()?;
        let arrived = (self.clock)();
        let (id_tx, id_rx) = channel();
        commands.send(Command::Generate(Box::new(request), arrived, id_tx, sink)).map_err(|_| stopped())?;
        id_rx.recv().map_err(|_| stopped())?
    }

    fn commands(&self) -> Result<&Sender<Command>> {
        match &self.served {
            Served::Decoder { commands, .. } => Ok(commands),
            Served::Encoder { .. } => Err(TwinferError::InvalidParameter("this model is an encoder: use embed".into())),
        }
    }

    /// Stops a request; its events still end with `Finished`. An unknown or finished id is
    /// ignored. Does not wait for the engine thread.
    pub fn cancel(&self, id: RequestId) {
        if let Served::Decoder { commands, .. } = &self.served {
            let _ = commands.send(Command::Cancel(id));
        }
    }

    /// Runs a request to its end: (text, tokens, finish reason, metrics).
    pub fn generate_blocking(&self, request: GenerateRequest) -> Result<Event> {
        self.generate(request)?.last().ok_or_else(stopped)
    }

    /// Metrics over the requests finished so far; `reset` starts a new window.
    pub fn metrics(&self, reset: bool) -> Result<RunMetrics> {
        let Served::Decoder { commands, .. } = &self.served else {
            return Ok(RunMetrics::default());
        };
        let (tx, rx) = channel();
        commands.send(Command::Metrics(tx, reset)).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())
    }

    /// Requests and KV pages held now (an encoder holds none).
    pub fn stats(&self) -> Result<EngineStats> {
        let Served::Decoder { commands, .. } = &self.served else {
            return Ok(EngineStats::default());
        };
        let (tx, rx) = channel();
        commands.send(Command::Stats(tx)).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())
    }

    /// Seconds until `prompt` would get its first token if it were submitted now, by the step-time
    /// model the engine fitted to its own steps (see [`Scheduler::predicted_ttft`]); `None`
    /// before that model has a warm prompt step. Blocks until the engine thread answers.
    pub fn predicted_ttft(&self, prompt: &[u32]) -> Result<Option<f64>> {
        let commands = self.commands()?;
        let (tx, rx) = channel();
        commands.send(Command::Predict(prompt.to_vec(), tx)).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())
    }

    /// One L2-normalised embedding per text (encoder models).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let Served::Encoder { model, tokenizer, level, attention } = &self.served else {
            return Err(TwinferError::InvalidParameter("this model is a decoder: use generate".into()));
        };
        let ids = texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<Vec<_>>>()?;
        model.embed(*level, attention, &ids)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Served::Decoder { commands, worker, .. } = &mut self.served {
            // Explicitly: cancel handles may keep the channel open past the engine.
            let _ = commands.send(Command::Shutdown);
            if let Some(w) = worker.take() {
                let _ = w.join();
            }
        }
    }
}

fn stopped() -> TwinferError {
    TwinferError::InvalidParameter("the engine has stopped".into())
}

/// The worker: takes commands, steps while there is work, routes events to their streams.
fn serve(mut scheduler: Scheduler, commands: Receiver<Command>) {
    let mut streams: HashMap<RequestId, EventSink> = HashMap::new();
    loop {
        let next = if scheduler.has_work() {
            match commands.try_recv() {
                Ok(c) => Some(c),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        if let Some(c) = next {
            match c {
                Command::Generate(req, arrived, id_tx, sink) => {
                    let added = scheduler.add_arrived(*req, arrived);
                    if let Ok(id) = added {
                        streams.insert(id, sink);
                    }
                    let _ = id_tx.send(added);
                }
                Command::Cancel(id) => {
                    scheduler.cancel(id);
                }
                Command::Stats(tx) => {
                    let cache = scheduler.cache();
                    let _ = tx.send(EngineStats {
                        running: scheduler.num_running(),
                        waiting: scheduler.num_waiting(),
                        kv_pages_total: cache.num_pages(),
                        kv_pages_free: cache.free_pages(),
                        page_size: cache.config().layout.page_size,
                        pending_prompt_tokens: scheduler.pending_prompt_tokens(),
                        step_cost: scheduler.step_cost(),
                    });
                }
                Command::Predict(prompt, tx) => {
                    let _ = tx.send(scheduler.predicted_ttft(&prompt));
                }
                Command::Shutdown => return,
                Command::Metrics(tx, reset) => {
                    let _ = tx.send(scheduler.run_metrics());
                    if reset {
                        scheduler.reset_metrics();
                    }
                }
            }
            continue;
        }
        match scheduler.step() {
            Ok(events) => {
                for e in events {
                    let id = e.request();
                    let last = matches!(e, Event::Finished { .. });
                    let delivered = streams.get_mut(&id).is_some_and(|sink| sink(e));
                    if last {
                        streams.remove(&id);
                    } else if !delivered {
                        // Nobody listens any more (the stream was dropped): stop the request.
                        scheduler.cancel(id);
                    }
                }
            }
            Err(err) => {
                // A failed step (a device lost, a kernel error) ends every request it touched
                // with the reason; the engine keeps serving new ones.
                let ids: Vec<RequestId> = streams.keys().copied().collect();
                for id in ids {
                    scheduler.cancel(id);
                    if let Some(mut sink) = streams.remove(&id) {
                        sink(Event::Finished {
                            request: id,
                            reason: FinishReason::Failed(err.to_string()),
                            text: String::new(),
                            tokens: Vec::new(),
                            metrics: Default::default(),
                        });
                    }
                }
                let _ = scheduler.step();
            }
        }
    }
}

// A server shares one engine between its connection tasks.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Engine>();
};
