//! What runs when a test binary exits: each part registers its own hook here (the cluster's
//! removal, the NOT RUN summary), so the parts need not know each other.

use std::sync::{Mutex, Once};

static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Runs `hook` when the test binary exits; registering the same hook twice runs it once.
pub(crate) fn on_exit(hook: fn()) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: `run_hooks` is a plain `extern "C" fn()`; the hooks never panic (they only
        // lock, write and run commands, ignoring their errors).
        unsafe {
            libc::atexit(run_hooks);
        }
    });
    let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
    if !hooks.iter().any(|h| std::ptr::fn_addr_eq(*h, hook)) {
        hooks.push(hook);
    }
}

extern "C" fn run_hooks() {
    let hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for hook in hooks {
        hook();
    }
}
