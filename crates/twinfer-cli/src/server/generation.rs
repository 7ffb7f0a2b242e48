//! One request through a local engine, from the async side: submitted on a blocking thread (the
//! engine accepts requests between steps), its events handed over through an unbounded channel
//! (the engine thread never waits on a client), and cancelled as soon as its client is gone: the
//! guard's drop cancels it, and so does the engine's next send into a closed channel.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use twinfer::engine::{Engine, Event, FinishReason, GenerateRequest, RequestId, RequestMetrics};

use super::errors::{ApiError, ApiResult};
use super::metrics::{Route, Served, ServerMetrics};

/// Cancels the request when dropped before its end (the client disconnected).
#[derive(Debug)]
pub struct CancelOnDrop {
    engine: Arc<Engine>,
    id: RequestId,
    pub finished: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.cancel(self.id);
        }
    }
}

/// A request the engine accepted.
#[derive(Debug)]
pub struct Running {
    pub events: UnboundedReceiver<Event>,
    pub guard: CancelOnDrop,
    /// Seconds from the server's receipt of the request to the engine's submission clock.
    pub queued: f64,
}

/// The end of a request.
#[derive(Debug)]
pub struct Finished {
    pub text: String,
    pub reason: FinishReason,
    pub completion_tokens: usize,
    pub metrics: RequestMetrics,
}

/// Submits `request`. Its metrics are recorded on the engine thread as it ends, so that a request
/// whose client left is counted too.
pub async fn submit(
    engine: &Arc<Engine>,
    model: &str,
    request: GenerateRequest,
    received: Instant,
    metrics: &Arc<ServerMetrics>,
) -> ApiResult<Running> {
    let (tx, events) = unbounded_channel();
    let (engine2, metrics, model) = (engine.clone(), metrics.clone(), model.to_string());
    let (id, queued) = tokio::task::spawn_blocking(move || {
        let queued = received.elapsed().as_secs_f64();
        let sink = Box::new(move |e: Event| {
            match &e {
                Event::Token { .. } => metrics.token(),
                Event::Finished { reason, tokens, metrics: m, .. } => {
                    metrics.finished(&model, Route::Local, reason_label(reason), &served(m, tokens.len(), queued))
                }
            }
            tx.send(e).is_ok()
        });
        engine2.generate_with(request, sink).map(|id| (id, queued))
    })
    .await
    .map_err(|e| ApiError::server(format!("the submitting thread failed: {e}")))??;
    Ok(Running { events, guard: CancelOnDrop { engine: engine.clone(), id, finished: false }, queued })
}

impl Running {
    /// Waits for the end, dropping the token events (a non-streamed answer).
    pub async fn finish(mut self) -> ApiResult<Finished> {
        while let Some(e) = self.events.recv().await {
            if let Some(f) = self.end(e) {
                return Ok(f);
            }
        }
        Err(engine_gone())
    }

    /// The request's end if `e` is it; marks the guard so that its drop cancels nothing.
    pub fn end(&mut self, e: Event) -> Option<Finished> {
        match e {
            Event::Finished { reason, text, tokens, metrics, .. } => {
                self.guard.finished = true;
                Some(Finished { text, reason, completion_tokens: tokens.len(), metrics })
            }
            Event::Token { .. } => None,
        }
    }
}

/// A finish reason as the metrics label it: OpenAI's words where it has them.
fn reason_label(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Failed(_) => "failed",
    }
}

pub fn engine_gone() -> ApiError {
    ApiError::unavailable("the engine stopped before the request finished")
}

impl Finished {
    /// OpenAI's finish reason, or the error that ended the request.
    pub fn openai_reason(&self) -> ApiResult<&'static str> {
        match &self.reason {
            FinishReason::Length => Ok("length"),
            FinishReason::Eos | FinishReason::StopToken(_) | FinishReason::StopString(_) => Ok("stop"),
            FinishReason::Cancelled => Err(ApiError::unavailable("the request was cancelled")),
            FinishReason::Failed(why) => Err(ApiError::server(format!("generation failed: {why}"))),
        }
    }

    pub fn served(&self, queued: f64) -> Served {
        served(&self.metrics, self.completion_tokens, queued)
    }
}

/// A request's times as the server saw them: from its arrival, not its submission.
fn served(m: &RequestMetrics, generated_tokens: usize, queued: f64) -> Served {
    Served {
        prompt_tokens: m.prompt_tokens,
        cached_tokens: m.cached_tokens,
        generated_tokens,
        ttft: m.ttft().map(|t| t + queued),
        tpot: m.tpot(),
        itl: m.itl(),
        e2e: m.e2e + queued,
        preemptions: m.preemptions,
    }
}
