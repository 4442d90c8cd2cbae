//! An HTTP/1.1 connection over a dialled byte stream, with a wrapper that notes when the
//! request in flight was written and when its answer started to arrive.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use crate::sync::lock;

/// A byte stream: plain TCP or TLS over TCP.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One HTTP/1.1 connection.
pub(super) struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    times: Arc<Mutex<IoTimes>>,
    driver: Driver,
}

type ConnectionFuture = hyper::client::conn::http1::Connection<TokioIo<TimedIo>, Empty<Bytes>>;

/// What drives a connection's I/O. A fresh connection is driven inside the probe's own task,
/// so a probe costs no task hand-offs (they added about 100 µs at p50 in the fidelity
/// benchmark); a connection kept for reuse gets a task of its own, which keeps it alive
/// between rounds.
enum Driver {
    Inline(Pin<Box<ConnectionFuture>>),
    Spawned(AbortOnDrop),
}

/// Aborts the task that drives a connection when the connection is dropped, so a peer that
/// never answers cannot keep a task and a socket alive.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Connection {
    /// Speaks HTTP/1.1 over `io`; `keep` gives the connection a task of its own so it can
    /// outlive the probe.
    pub(super) async fn open(io: Box<dyn Io>, keep: bool) -> Result<Self, hyper::Error> {
        let times = Arc::new(Mutex::new(IoTimes::default()));
        let timed = TimedIo { inner: io, times: times.clone() };
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(timed)).await?;
        let driver = if keep {
            Driver::Spawned(AbortOnDrop(tokio::spawn(async move {
                let _ = driver.await;
            })))
        } else {
            Driver::Inline(Box::pin(driver))
        };
        Ok(Self { sender, times, driver })
    }

    /// Sends `request` and waits for the response head.
    pub(super) async fn send(
        &mut self,
        request: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        lock(&self.times).reset();
        let sender = &mut self.sender;
        let send = async move {
            sender.ready().await?;
            sender.send_request(request).await
        };
        match &mut self.driver {
            Driver::Inline(io) => {
                tokio::pin!(send);
                tokio::select! {
                    biased;
                    sent = &mut send => sent,
                    // The connection ended first: the request then fails with the reason.
                    _ = io.as_mut() => send.await,
                }
            }
            Driver::Spawned(_) => send.await,
        }
    }

    /// The write and read instants of the request in flight.
    pub(super) fn times(&self) -> IoTimes {
        lock(&self.times).clone()
    }

    /// Can carry another request.
    pub(super) fn is_open(&self) -> bool {
        let finished = match &self.driver {
            Driver::Inline(_) => false,
            Driver::Spawned(task) => task.0.is_finished(),
        };
        !self.sender.is_closed() && !finished
    }
}

/// When the current request was last written and when its answer started to arrive.
#[derive(Debug, Default, Clone)]
pub(super) struct IoTimes {
    pub(super) last_write: Option<Instant>,
    pub(super) first_read: Option<Instant>,
    pub(super) write_error: bool,
}

impl IoTimes {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Notes write and first-read instants of the request in flight.
struct TimedIo {
    inner: Box<dyn Io>,
    times: Arc<Mutex<IoTimes>>,
}

impl TimedIo {
    fn wrote<T>(&self, result: &Poll<io::Result<T>>) {
        match result {
            Poll::Ready(Ok(_)) => {
                let mut t = lock(&self.times);
                if t.first_read.is_none() {
                    t.last_write = Some(Instant::now());
                }
            }
            Poll::Ready(Err(_)) => lock(&self.times).write_error = true,
            Poll::Pending => {}
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut t = lock(&self.times);
            if t.first_read.is_none() {
                t.first_read = Some(Instant::now());
            }
        }
        result
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(&result);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
