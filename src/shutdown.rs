//! Termination signals: the first starts a graceful shutdown, a second one exits at once.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Exit status when a second signal cuts the shutdown short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// SIGTERM and SIGINT, caught from the moment this is made: installed before the agent starts,
/// so a signal that arrives while it starts (or mid-round) is never the default action.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for SIGTERM or SIGINT; afterwards, a second one ends the process immediately.
    pub async fn first(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(EXIT_INTERRUPTED);
        });
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
