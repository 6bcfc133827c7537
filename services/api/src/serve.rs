//! The HTTP server under the limits a public sale needs: a connection that
//! has not sent a whole request head within `API_HEADER_TIMEOUT` is closed
//! (slow loris), an idle keep-alive connection after [`IDLE_TIMEOUT`], and no
//! more than `API_MAX_CONNECTIONS` are open at once (the rest wait in the
//! kernel's backlog). The body timeout and load shedding are the handlers'
//! (see `routes::buy`), since they answer with a status.
//!
//! hyper's own header timer cannot serve here: it also runs while a
//! keep-alive connection waits for its next request, so it would close idle
//! connections after the header timeout instead of after [`IDLE_TIMEOUT`].
//! Each connection has one watchdog instead, woken only at its next deadline.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// On shutdown, requests in progress get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection limits (`API_HEADER_TIMEOUT`, `API_MAX_CONNECTIONS`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// requests in progress finish (at most [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let (tcp, peer, slot) = accepted;
        let router = router.clone();
        let stopped = stopped.clone();
        connections.spawn(async move {
            serve_connection(tcp, peer, router, limits, stopped).await;
            drop(slot);
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in progress after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

/// The next connection, once a slot is free.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit) {
    let Ok(slot) = Arc::clone(slots).acquire_owned().await else {
        unreachable!("the connection semaphore is never closed")
    };
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                return (tcp, peer, slot);
            }
            // Out of file descriptors, or a connection reset before accept:
            // wait a moment rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What the watchdog knows of one connection.
struct Activity {
    born: Instant,
    /// Milliseconds since `born` of the last request's end (or the start).
    last_done_ms: AtomicU64,
    /// Milliseconds since `born` (plus one) when the first byte of the
    /// request head now being read arrived; 0 when none is being read.
    head_started_ms: AtomicU64,
    /// Requests dispatched and not yet answered.
    in_flight: AtomicUsize,
    /// Wakes the watchdog when a head starts: its deadline moved closer.
    head_began: tokio::sync::Notify,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Bytes arrived: between requests, they start a head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let now = self.now_ms() + 1;
            let began =
                self.head_started_ms
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
            if began.is_ok() {
                self.head_began.notify_one();
            }
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
    }

    fn request_done(&self) {
        self.last_done_ms.store(self.now_ms(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// When this connection is to be closed if nothing changes; `None`
    /// while a request is in progress (its handler has its own deadlines).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        Some(match self.head_started_ms.load(Ordering::Acquire) {
            0 => self.born + ms(self.last_done_ms.load(Ordering::Acquire)) + limits.idle_timeout,
            started => self.born + ms(started - 1) + limits.header_timeout,
        })
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        born: Instant::now(),
        last_done_ms: AtomicU64::new(0),
        head_started_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        head_began: tokio::sync::Notify::new(),
    });
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            use tower::ServiceExt;
            activity.request_started();
            request.extensions_mut().insert(ConnectInfo(peer));
            let finished = RequestDone(Arc::clone(&activity));
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(axum::body::Body::new)).await;
                // The request ends with its body, not its head: a stream
                // (Server-Sent Events) is a request in progress, never idle.
                response.map(|r| {
                    r.map(|body| UntilBodyEnds {
                        body,
                        _finished: finished,
                    })
                })
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            changed = stopped.changed(), if !closing => {
                if changed.is_err() || *stopped.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = activity.head_began.notified() => {}
            () = sleep_until(deadline) => {
                // Still past it (no byte and no request moved it): close.
                if activity.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        // A request is in progress: look again shortly after it ends.
        None => tokio::time::sleep(Duration::from_secs(1)).await,
    }
}

/// Marks the request done when its response body has been sent (hyper drops
/// it then), or when the client went away and hyper dropped it unsent.
struct RequestDone(Arc<Activity>);

/// A response body that keeps its request in progress until it is dropped.
struct UntilBodyEnds {
    body: axum::body::Body,
    _finished: RequestDone,
}

impl hyper::body::Body for UntilBodyEnds {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// The TCP stream, telling the watchdog when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const GET: &[u8] = b"GET /hi HTTP/1.1\r\nHost: test\r\n\r\n";

    async fn server(limits: ConnectionLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/hi", get(|| async { "hi" }));
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        (addr, stop)
    }

    fn limits(header: u64, idle: u64, max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_millis(header),
            idle_timeout: Duration::from_millis(idle),
            max_connections,
        }
    }

    /// Reads until the peer closes; the time it took, or `None` if still open after `wait`.
    async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(wait, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    async fn answered(tcp: &mut TcpStream) -> String {
        let mut buf = vec![0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_half_sent_head_is_closed_after_the_header_timeout() {
        let (addr, _stop) = server(limits(300, 60_000, 100)).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /buy HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        let took = closed_within(&mut slow, Duration::from_secs(5)).await;
        let took = took.expect("a half-sent head was never closed");
        assert!(
            took >= Duration::from_millis(250),
            "closed too early: {took:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_lives_past_the_header_timeout_until_the_idle_timeout() {
        let (addr, _stop) = server(limits(200, 900, 100)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(GET).await.unwrap();
        assert!(answered(&mut tcp).await.starts_with("HTTP/1.1 200"));
        // Idle, not half-sent: the header timeout does not apply.
        assert!(
            closed_within(&mut tcp, Duration::from_millis(500))
                .await
                .is_none()
        );
        tcp.write_all(GET).await.unwrap();
        assert!(answered(&mut tcp).await.starts_with("HTTP/1.1 200"));
        let took = closed_within(&mut tcp, Duration::from_secs(5)).await;
        let took = took.expect("an idle connection was never closed");
        assert!(
            took >= Duration::from_millis(800),
            "closed too early: {took:?}"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_until_one_closes() {
        let (addr, _stop) = server(limits(10_000, 60_000, 2)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        for tcp in [&mut first, &mut second] {
            tcp.write_all(GET).await.unwrap();
            assert!(answered(tcp).await.starts_with("HTTP/1.1 200"));
        }
        // The kernel completes the handshake, but nobody serves the third.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(early.is_err(), "a connection beyond the cap was served");
        drop(first);
        let late = tokio::time::timeout(Duration::from_secs(5), answered(&mut third)).await;
        assert!(late.unwrap().starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn a_stream_outlives_the_idle_timeout_and_the_connection_idles_after_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Five chunks 200 ms apart: a stream of 1 s against an idle timeout of 400 ms.
        let router = Router::new().route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0, |n| async move {
                    if n == 5 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Ok::<_, io::Error>(format!("chunk{n};")), n + 1))
                });
                axum::body::Body::from_stream(chunks)
            }),
        );
        let (_stop, mut stopped) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            router,
            limits(10_000, 400, 10),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut received = String::new();
        let mut buf = [0u8; 1024];
        while !received.contains("chunk4;") {
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "the stream was cut after {:?}: {received}",
                started.elapsed()
            );
            received.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // Once the stream ended the connection is idle, and closed as such.
        let took = closed_within(&mut tcp, Duration::from_secs(5)).await;
        assert!(
            took.is_some(),
            "an idle connection after a stream was never closed"
        );
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_progress_finish() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let (stop, mut stopped) = watch::channel(false);
        let served = tokio::spawn(serve(
            listener,
            router,
            limits(10_000, 60_000, 10),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        let answer = answered(&mut tcp).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
