//! Log output kept in memory, for unit tests anywhere in the crate that check what was
//! logged (or that nothing was).

use std::sync::{Arc, Mutex, OnceLock};
use tracing_subscriber::fmt::MakeWriter;

/// What a subscriber wrote; clones share it. Give it to `with_writer`.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Every log line of the test process from the first call on, in a global subscriber. Work
/// spread over threads needs it (a worker thread does not see its caller's scoped
/// subscriber); so do tests running beside others: tracing caches a log line's interest
/// per process, and while only one subscriber is registered a line first reached on a thread
/// without one is cached as never wanted, even for another thread's scoped subscriber. Lines
/// carry their spans: a test picks its own by a span of its own.
pub(crate) fn global() -> &'static Captured {
    static BUF: OnceLock<Captured> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        buf
    })
}
