//! A cap on the server's open connections: each accepted TCP connection
//! holds a permit for as long as it is open, and one accepted beyond the
//! cap is closed at once (logged, at most once a second), so no number of
//! idle or slow clients exhausts the server's file descriptors or memory.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that counts against the cap while it lives.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// `incoming` with at most `max` connections open at once.
pub fn limit(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = io::Result<Counted>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max.max(1)));
    let last_warning: Arc<Mutex<Option<Instant>>> = Arc::default();
    incoming.filter_map(move |accepted| {
        let permits = permits.clone();
        let last_warning = last_warning.clone();
        async move {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some(Err(error)),
            };
            match permits.try_acquire_owned() {
                Ok(permit) => Some(Ok(Counted {
                    stream,
                    _permit: permit,
                })),
                Err(_) => {
                    let mut last = last_warning.lock().unwrap_or_else(|e| e.into_inner());
                    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        *last = Some(Instant::now());
                        tracing::warn!(
                            max,
                            peer = ?stream.peer_addr().ok(),
                            "connection refused: the server holds max_connections open"
                        );
                    }
                    None
                }
            }
        }
    })
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
