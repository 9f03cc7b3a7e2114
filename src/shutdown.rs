//! One shutdown signal that every loop selects on (the mini-redis `Shutdown` pattern, built
//! on a channel that is closed, never sent on).

use smol::channel::{Receiver, Sender, bounded};

/// The listening side; clone it into every task.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Closed when shutdown starts.
    rx: Receiver<()>,
}

/// The triggering side, held by the app.
#[derive(Debug)]
pub struct Trigger {
    /// Closing it wakes every [`Shutdown::wait`].
    tx: Sender<()>,
}

/// A new signal pair.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = bounded(1);
    (Trigger { tx }, Shutdown { rx })
}

impl Shutdown {
    /// Resolves once shutdown has started (at once if it already has).
    pub async fn wait(&self) {
        let _ = self.rx.recv().await;
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.rx.is_closed()
    }
}

impl Trigger {
    /// Starts shutdown.
    pub fn trigger(&self) {
        self.tx.close();
    }
}
