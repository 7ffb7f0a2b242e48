//! Waiting for the GPU. Every call that may wait is written once as `async`; its blocking twin
//! drives the future here. Natively that blocks the thread (pollster). A browser's main thread
//! cannot block (a buffer map resolves only after control returns to the event loop), so there
//! the future is polled once: work that never waits (the CPU engine) completes, and work that
//! would wait fails with [`TwinferError::WouldBlock`] instead of hanging.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::{Result, TwinferError};

/// Runs `fut` to completion from synchronous code; `call` names the blocking API for the error.
pub(crate) fn block_on<F: Future>(call: &'static str, fut: F) -> Result<F::Output> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = call;
        Ok(pollster::block_on(fut))
    }
    #[cfg(target_arch = "wasm32")]
    {
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Ok(v),
            Poll::Pending => Err(TwinferError::WouldBlock { call }),
        }
    }
}

/// Whether a blocking call may wait here (false on wasm32, where it must use the async twin).
pub(crate) const CAN_BLOCK: bool = cfg!(not(target_arch = "wasm32"));

/// [`block_on`] for work that always waits for the GPU: in a browser it fails before starting
/// anything, so no submission is left behind half-read.
pub(crate) fn blocking<F: Future>(call: &'static str, fut: F) -> Result<F::Output> {
    if !CAN_BLOCK {
        return Err(TwinferError::WouldBlock { call });
    }
    block_on(call, fut)
}

#[derive(Debug)]
struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A value delivered once by a callback (a buffer map), awaited by the call that asked for it.
#[derive(Debug)]
pub(crate) struct Oneshot<T>(Arc<Mutex<Slot<T>>>);

impl<T> Oneshot<T> {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(Slot { value: None, waker: None })))
    }

    /// The callback's half: stores the value and wakes the waiting task.
    pub(crate) fn sender(&self) -> impl FnOnce(T) + Send + 'static
    where
        T: Send + 'static,
    {
        let slot = self.0.clone();
        move |v| {
            let waker = match slot.lock() {
                Ok(mut s) => {
                    s.value = Some(v);
                    s.waker.take()
                }
                Err(_) => None,
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// The value, if it has arrived.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn try_take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut s| s.value.take())
    }
}

impl<T> Future for Oneshot<T> {
    type Output = Result<T>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let Ok(mut s) = self.0.lock() else {
            return Poll::Ready(Err(TwinferError::DeviceLost("a GPU callback panicked".into())));
        };
        match s.value.take() {
            Some(v) => Poll::Ready(Ok(v)),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ready_futures_complete_from_sync_code() {
        assert_eq!(block_on("test", async { 7 }).unwrap(), 7);
    }

    #[test]
    fn oneshot_delivers_the_callbacks_value() {
        let o = Oneshot::new();
        (o.sender())(3u32);
        assert_eq!(block_on("test", o).unwrap().unwrap(), 3);
    }

    #[cfg(target_arch = "wasm32")]
    #[test]
    fn a_pending_future_is_a_typed_error_not_a_hang() {
        let o = Oneshot::<u32>::new();
        assert_eq!(
            block_on("Attention::prefill", o).unwrap_err(),
            TwinferError::WouldBlock { call: "Attention::prefill" }
        );
    }
}
