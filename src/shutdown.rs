//! Termination signals: the first starts a graceful shutdown, a second one exits at once.

use tokio::signal::unix::{signal, SignalKind};

/// Exit status when a second signal cuts the shutdown short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Waits for SIGTERM or SIGINT; afterwards, a second one ends the process immediately.
pub async fn first_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested; a second signal exits at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(EXIT_INTERRUPTED);
    });
    Ok(())
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
