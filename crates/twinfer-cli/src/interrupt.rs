//! Ctrl-C stops generation cleanly: the request is cancelled, its stream ends with the metrics
//! so far, and the process exits normally.

use std::sync::{Mutex, OnceLock};

type Handler = Box<dyn Fn() + Send + Sync>;
static HANDLER: OnceLock<Mutex<Option<Handler>>> = OnceLock::new();

/// Runs `cancel` on the next Ctrl-C (a second one exits at once).
pub fn on_ctrl_c(cancel: impl Fn() + Send + Sync + 'static) {
    let slot = HANDLER.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            let taken = HANDLER.get().and_then(|m| m.lock().ok().and_then(|mut h| h.take()));
            match taken {
                Some(cancel) => cancel(),
                None => std::process::exit(130),
            }
        });
        Mutex::new(None)
    });
    if let Ok(mut h) = slot.lock() {
        *h = Some(Box::new(cancel));
    }
}
