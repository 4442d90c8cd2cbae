//! An accepted TCP stream that gives up on clients that stop reading.
//!
//! A write (or flush) that makes no progress for the write timeout fails with `TimedOut`,
//! which ends the connection; any progress starts the clock again. A connection that ends
//! this way, or is pushed out of its slot, closes with a reset: whatever is still queued for a
//! client that does not read is dropped at once instead of lingering in the kernel.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

pub struct GuardedStream {
    inner: TcpStream,
    write_timeout: Duration,
    /// Runs while a write is blocked; `None` until the first block.
    stalled: Option<Pin<Box<Sleep>>>,
    blocked: bool,
    reset: Arc<AtomicBool>,
}

impl GuardedStream {
    /// Wraps `inner`; `reset`, once true, makes the close a reset.
    pub fn new(inner: TcpStream, write_timeout: Duration, reset: Arc<AtomicBool>) -> Self {
        Self { inner, write_timeout, stalled: None, blocked: false, reset }
    }

    fn watch_progress<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.blocked = false;
            return poll;
        }
        if !self.blocked {
            self.blocked = true;
            let deadline = Instant::now() + self.write_timeout;
            match &mut self.stalled {
                Some(stalled) => stalled.as_mut().reset(deadline),
                None => self.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if self.stalled.as_mut().is_some_and(|stalled| stalled.as_mut().poll(cx).is_ready()) {
            self.reset.store(true, Ordering::SeqCst);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")));
        }
        Poll::Pending
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch_progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch_progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch_progress(cx, poll)
    }
}
