//! A streamed answer as server-sent events: OpenAI's chunks, then `data: [DONE]`. A request that
//! fails after the stream began ends with an `{"error": ...}` event, which OpenAI's clients raise
//! as an exception. Dropping the stream (the client went away) drops the request's guard, which
//! cancels the request.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::Value;
use twinfer::engine::Event;

use super::generation::{Running, engine_gone};
use super::responses::{Header, Kind};

struct State {
    running: Running,
    header: Header,
    include_usage: bool,
    pending: VecDeque<SseEvent>,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

pub fn sse(
    running: Running,
    header: Header,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut pending = VecDeque::new();
    if header.kind == Kind::Chat {
        pending.push_back(data(&header.role_chunk()));
    }
    let state = State { running, header, include_usage, pending, done: false };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            s.done = s.next_events().await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

impl State {
    /// Queues the events for the engine's next event; true at the end.
    async fn next_events(&mut self) -> bool {
        let Some(event) = self.running.events.recv().await else {
            self.pending.push_back(data(&engine_gone().body()));
            self.pending.push_back(SseEvent::default().data("[DONE]"));
            return true;
        };
        if let Event::Token { text, .. } = &event {
            if !text.is_empty() {
                self.pending.push_back(data(&self.header.text_chunk(text)));
            }
            return false;
        }
        let Some(finished) = self.running.end(event) else { return false };
        let served = finished.served(self.running.queued);
        match finished.openai_reason() {
            Ok(reason) => {
                self.pending.push_back(data(&self.header.finish_chunk(reason, &served)));
                if self.include_usage {
                    self.pending.push_back(data(&self.header.usage_chunk(&served)));
                }
            }
            Err(e) => self.pending.push_back(data(&e.body())),
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        true
    }
}
