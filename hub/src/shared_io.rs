//! A connection's byte stream shared between its owner (hyper, then tungstenite once the
//! connection is a WebSocket) and the fan-out in [`crate::broadcast`], which writes a bump's
//! pre-encoded WebSocket frame straight to it: one `write` per socket, without going through
//! the socket's WebSocket layer.
//!
//! The stream sits behind a mutex, beside the fan-out's record of the socket (see
//! [`crate::broadcast::Fan`]): a fan-out takes one lock per socket and reads one pair of
//! cache lines of it. A raw frame goes in only at a frame boundary: when the layer above has nothing
//! half-written (its last write took all it offered; tungstenite always offers its whole
//! buffer, so it then holds nothing) and no earlier raw frame is left. A raw frame the kernel
//! takes only part of is kept here and written first by the next write or flush of the layer
//! above, so frames never interleave. Under TLS the stream is the TLS stream: a raw frame is
//! encrypted like any other write. On a plain TCP connection, held inline here, the raw frame
//! goes to the socket with one `send`, past tokio's readiness: a full kernel buffer answers
//! "would block" and the frame is left to the connection's task, whose own write then waits for
//! room as usual. The connection's write deadline is a layer above this one: it times the
//! connection's own writes, and the raw writes never wait.

use crate::broadcast::Fan;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a raw write did.
#[derive(Debug, PartialEq, Eq)]
pub enum RawWrite {
    /// The whole frame is with the kernel.
    Written,
    /// The frame is committed (it will go out before anything else), but part of it, or its
    /// TLS record, waits: the connection's own task must flush.
    Started,
    /// Nothing was written: the connection's own task must send the frame.
    NotNow,
}

/// A connection's stream: a plain TCP socket inline, where a fan-out finds its descriptor in
/// the cache line it reads anyway, or another stream (TLS) behind a box.
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Other(Pin<Box<dyn ReadWrite>>),
}

/// What [`Stream::Other`] holds.
pub trait ReadWrite: AsyncRead + AsyncWrite + Send {}

impl<S: AsyncRead + AsyncWrite + Send> ReadWrite for S {}

impl From<tokio::net::TcpStream> for Stream {
    fn from(tcp: tokio::net::TcpStream) -> Self {
        Stream::Tcp(tcp)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> From<tokio_rustls::server::TlsStream<S>>
    for Stream
{
    fn from(tls: tokio_rustls::server::TlsStream<S>) -> Self {
        Stream::Other(Box::pin(tls))
    }
}

impl From<tokio::io::DuplexStream> for Stream {
    fn from(s: tokio::io::DuplexStream) -> Self {
        Stream::Other(Box::pin(s))
    }
}

impl Stream {
    fn io(&mut self) -> Pin<&mut dyn ReadWrite> {
        match self {
            Stream::Tcp(tcp) => Pin::<&mut tokio::net::TcpStream>::new(tcp),
            Stream::Other(other) => other.as_mut(),
        }
    }
}

/// A connection's shared state. In C order, what a fan-out reads: the stream (a plain
/// socket's descriptor), the flags, the fan-out's record and a raw frame's rest, which with
/// the lock before them fit the pair of cache lines `Shared` is aligned to.
#[repr(C)]
pub struct State {
    stream: Stream,
    /// The layer above offered bytes the stream did not take: it may be mid-frame.
    above_unfinished: bool,
    /// A raw frame was written but not flushed (TLS keeps records until then).
    unflushed: bool,
    /// The fan-out's record of the socket.
    pub fan: Fan,
    /// The rest of a raw frame the kernel did not take yet.
    pending: Bytes,
}

impl State {
    /// Writes what is left of a raw frame; ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(self.stream.io().poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let _ = self.pending.split_to(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `frame`, one or more whole WebSocket frames, without waiting.
    pub fn try_write(&mut self, frame: &Bytes, cx: &mut Context<'_>) -> RawWrite {
        if self.above_unfinished || self.unflushed || !self.pending.is_empty() {
            return RawWrite::NotNow;
        }
        if let Stream::Tcp(tcp) = &self.stream {
            // Nothing to flush after a plain socket's write.
            return match socket2::SockRef::from(tcp).send(frame) {
                Ok(n) if n == frame.len() => RawWrite::Written,
                Ok(n) if n > 0 => {
                    self.pending = frame.slice(n..);
                    RawWrite::Started
                }
                // Would block (or an error the connection's task will meet itself).
                _ => RawWrite::NotNow,
            };
        }
        match self.stream.io().poll_write(cx, frame) {
            Poll::Ready(Ok(n)) if n == frame.len() => {}
            Poll::Ready(Ok(n)) if n > 0 => {
                self.pending = frame.slice(n..);
                return RawWrite::Started;
            }
            // Nothing taken (or an error the connection's task will meet itself).
            _ => return RawWrite::NotNow,
        }
        match self.stream.io().poll_flush(cx) {
            Poll::Ready(Ok(())) => RawWrite::Written,
            _ => {
                self.unflushed = true;
                RawWrite::Started
            }
        }
    }
}

/// The state and its lock, aligned to a pair of cache lines: the lock and what a fan-out reads
/// after it are in the same pair, wherever the allocator put the connection. x86 processors
/// commonly fetch a line's partner in its 128-byte pair with it (Intel's spatial prefetcher).
#[repr(C, align(128))]
struct Shared(Mutex<State>);

/// The fan-out's side of a connection: as a request extension, how the WebSocket route finds
/// its connection's.
#[derive(Clone)]
pub struct RawConnection(Arc<Shared>);

impl RawConnection {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.0)
    }

    /// The state if nobody holds it (the connection's own task is reading or writing).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.0.0.try_lock() {
            Ok(st) => Some(st),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// The stream as its owner uses it; [`SharedIo::raw`] is the fan-out's side.
pub struct SharedIo {
    shared: Arc<Shared>,
}

impl SharedIo {
    pub fn new(stream: impl Into<Stream>) -> Self {
        SharedIo {
            shared: Arc::new(Shared(Mutex::new(State {
                stream: stream.into(),
                above_unfinished: false,
                unflushed: false,
                fan: Fan::default(),
                pending: Bytes::new(),
            }))),
        }
    }

    /// The fan-out's side: the same shared state.
    pub fn raw(&self) -> RawConnection {
        RawConnection(self.shared.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }
}

fn lock(m: &Shared) -> MutexGuard<'_, State> {
    // Nothing panics under this lock but the stream itself; its state is still the stream's.
    m.0.lock().unwrap_or_else(|e| e.into_inner())
}

impl AsyncRead for SharedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.lock().stream.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.lock();
        // Offered and not taken, whatever happens below, until a write takes it all.
        st.above_unfinished = true;
        ready!(st.poll_pending(cx))?;
        let n = ready!(st.stream.io().poll_write(cx, buf))?;
        st.above_unfinished = n < buf.len();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.lock();
        st.above_unfinished = true;
        ready!(st.poll_pending(cx))?;
        let n = ready!(st.stream.io().poll_write_vectored(cx, bufs))?;
        st.above_unfinished = n < bufs.iter().map(|b| b.len()).sum();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.lock().stream.io().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.lock();
        ready!(st.poll_pending(cx))?;
        ready!(st.stream.io().poll_flush(cx))?;
        st.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.lock();
        ready!(st.poll_pending(cx))?;
        st.stream.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// Writes of the layer above with a raw frame between them arrive in that order.
    async fn assert_raw_frame_between_writes<R>(io: &mut SharedIo, far: &mut R)
    where
        R: AsyncReadExt + Unpin,
    {
        let raw = io.raw();
        io.write_all(b"above-1|").await.unwrap();
        assert_eq!(
            raw.lock()
                .try_write(&Bytes::from_static(b"raw|"), &mut cx()),
            RawWrite::Written
        );
        io.write_all(b"above-2|").await.unwrap();
        let mut got = vec![0; 20];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"above-1|raw|above-2|");
    }

    #[tokio::test]
    async fn a_raw_frame_goes_between_the_writes_of_the_layer_above() {
        let (near, mut far) = tokio::io::duplex(64);
        assert_raw_frame_between_writes(&mut SharedIo::new(near), &mut far).await;
    }

    #[tokio::test]
    async fn a_raw_frame_the_stream_takes_in_part_is_finished_before_anything_else() {
        // Room for 8 bytes: the raw frame of 12 goes in part, and the rest must precede the
        // next write of the layer above.
        let (near, mut far) = tokio::io::duplex(8);
        let mut io = SharedIo::new(near);
        let raw = io.raw();
        assert_eq!(
            raw.lock()
                .try_write(&Bytes::from_static(b"raw-12-bytes"), &mut cx()),
            RawWrite::Started
        );
        assert_eq!(
            raw.lock()
                .try_write(&Bytes::from_static(b"more"), &mut cx()),
            RawWrite::NotNow,
            "nothing goes in while a raw frame is unfinished"
        );
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 19];
            far.read_exact(&mut got).await.unwrap();
            got
        });
        io.write_all(b"above|").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            raw.lock().try_write(&Bytes::from_static(b"x"), &mut cx()),
            RawWrite::Written
        );
        assert_eq!(reader.await.unwrap(), b"raw-12-bytesabove|x");
    }

    /// A plain TCP connection as the hub's accept loop wraps it.
    async fn tcp_pair() -> (SharedIo, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (far, near) = tokio::join!(far, listener.accept());
        (SharedIo::new(near.unwrap().0), far.unwrap())
    }

    #[tokio::test]
    async fn on_a_plain_tcp_connection_raw_frames_go_straight_to_the_socket_in_their_place() {
        let (mut io, mut far) = tcp_pair().await;
        assert!(
            matches!(io.lock().stream, Stream::Tcp(_)),
            "the socket is held inline"
        );
        assert_raw_frame_between_writes(&mut io, &mut far).await;

        // Raw frames until the kernel's buffers are full (nobody reads): the last one goes in
        // part or not at all, and what the layer above writes next comes after all of it.
        let raw = io.raw();
        let frame = Bytes::from(vec![b'r'; 64 * 1024]);
        let mut whole = 0usize;
        let last = loop {
            match raw.lock().try_write(&frame, &mut cx()) {
                RawWrite::Written => whole += 1,
                other => break other,
            }
            assert!(whole < 10_000, "the socket never filled");
        };
        let started = usize::from(last == RawWrite::Started);
        assert!(whole > 0);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all
        });
        io.write_all(b"|after").await.unwrap();
        io.shutdown().await.unwrap();
        let all = reader.await.unwrap();
        let raw_len = (whole + started) * frame.len();
        assert_eq!(all.len(), raw_len + 6, "every byte once");
        assert!(all[..raw_len].iter().all(|b| *b == b'r'));
        assert_eq!(&all[raw_len..], b"|after");
    }

    #[tokio::test]
    async fn no_raw_frame_goes_in_while_the_layer_above_is_mid_write() {
        let (near, mut far) = tokio::io::duplex(4);
        let mut io = SharedIo::new(near);
        let raw = io.raw();
        // The layer above offers 10 bytes and the stream takes 4.
        let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, b"0123456789"))
            .await
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            raw.lock().try_write(&Bytes::from_static(b"raw"), &mut cx()),
            RawWrite::NotNow
        );
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 10];
            far.read_exact(&mut got).await.unwrap();
            (got, far)
        });
        io.write_all(b"456789").await.unwrap();
        let (got, _far) = reader.await.unwrap();
        assert_eq!(&got, b"0123456789");
        assert_eq!(
            raw.lock().try_write(&Bytes::from_static(b"raw"), &mut cx()),
            RawWrite::Written
        );
    }

    #[tokio::test]
    async fn the_lock_and_what_a_fan_out_reads_share_one_pair_of_cache_lines() {
        let (io, _far) = tcp_pair().await;
        let start = Arc::as_ptr(&io.shared) as usize;
        assert_eq!(start % 128, 0, "the state starts a pair of cache lines");
        let st = io.lock();
        let at = |p: usize| p - start;
        let state = at(&*st as *const State as usize);
        // std's mutex keeps its lock word before the data it guards.
        assert!((4..=16).contains(&state), "the state at {state}");
        let end = |p: usize, size: usize| at(p) + size;
        let ends = [
            end(
                &st.stream as *const Stream as usize,
                std::mem::size_of::<Stream>(),
            ),
            end(&st.fan as *const Fan as usize, std::mem::size_of::<Fan>()),
            end(
                &st.pending as *const Bytes as usize,
                std::mem::size_of::<Bytes>(),
            ),
        ];
        assert!(ends.iter().all(|e| *e <= 128), "they end at {ends:?}");
    }
}
