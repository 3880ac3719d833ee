//! quinn and tonic over turmoil's simulated sockets.
//!
//! This module owns the glue that lets the real transports run in the
//! simulation: a `quinn::AsyncUdpSocket` over turmoil UDP, a `quinn::Runtime`
//! whose clock and timers are tokio's (paused and driven by turmoil), and
//! turmoil TCP streams for tonic's servers and clients. It must not change
//! what goes over the wire: one datagram per transmit, no GSO or GRO, no
//! ECN, exactly as a plain UDP socket would.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;

/// Largest datagram read at once.
const MAX_DATAGRAM: usize = 65_535;
/// Bound on connecting a simulated TCP stream.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

type Received = io::Result<(Vec<u8>, SocketAddr)>;
type RecvFuture = Pin<Box<dyn Future<Output = Received> + Send>>;

/// A turmoil UDP socket quinn can drive.
pub struct SimUdpSocket {
    socket: Arc<turmoil::net::UdpSocket>,
    local: SocketAddr,
    // The receive in progress: turmoil's receive is a future, quinn polls;
    // the future is kept across polls so no datagram is lost between them.
    pending: Mutex<Option<RecvFuture>>,
}

impl fmt::Debug for SimUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdpSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Binds a simulated UDP socket (inside a turmoil host).
pub async fn bind_udp(addr: SocketAddr) -> io::Result<Arc<SimUdpSocket>> {
    let socket = turmoil::net::UdpSocket::bind(addr).await?;
    let local = socket.local_addr()?;
    Ok(Arc::new(SimUdpSocket {
        socket: Arc::new(socket),
        local,
        pending: Mutex::new(None),
    }))
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        // turmoil queues every datagram (or drops it, as a full buffer
        // would): a send never waits.
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(segment) {
            // A failed send is a lost datagram, as with a real socket, never
            // an error: quinn ends a connection's driver on an error, and on
            // `WouldBlock` retries at once, because this socket is always
            // writable, resending the segments already sent. Turmoil fails a
            // send to an address no host in the simulation has, or a
            // broadcast the socket did not enable; it never says
            // `WouldBlock`.
            if let Err(e) = self.socket.try_send_to(chunk, transmit.destination) {
                tracing::trace!(error = %e, "simulated datagram dropped");
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut pending = self.pending.lock();
        let fut = pending.get_or_insert_with(|| {
            let socket = Arc::clone(&self.socket);
            Box::pin(async move {
                let mut data = vec![0u8; MAX_DATAGRAM];
                let (n, from) = socket.recv_from(&mut data).await?;
                data.truncate(n);
                Ok((data, from))
            })
        });
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                *pending = None;
                let (data, from) = result?;
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                *m = RecvMeta {
                    addr: from,
                    len: n,
                    stride: n,
                    ecn: None,
                    dst_ip: None,
                };
                Poll::Ready(Ok(1))
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// quinn's runtime in the simulation: tokio tasks and timers, and tokio's
/// (simulated) clock as quinn's `now`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimQuinnRuntime;

#[derive(Debug)]
struct SimTimer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for SimTimer {
    fn reset(mut self: Pin<&mut Self>, i: Instant) {
        self.0.as_mut().reset(tokio::time::Instant::from_std(i));
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.0.as_mut(), cx)
    }
}

impl Runtime for SimQuinnRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SimTimer(Box::pin(tokio::time::sleep_until(
            tokio::time::Instant::from_std(i),
        ))))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, _t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the simulator has no OS sockets; use bind_udp",
        ))
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A simulated TCP stream tonic can serve. Its connect info is tonic's
/// `TcpConnectInfo`, as over real TCP, so `Request::remote_addr` reports
/// the caller's address.
pub struct SimTcpStream(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimTcpStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.0.local_addr().ok(),
            remote_addr: self.0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for SimTcpStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimTcpStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Incoming connections of a simulated listener, for tonic's
/// `serve_with_incoming`.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl Stream<Item = io::Result<SimTcpStream>> + Send + 'static {
    // One task accepts and hands streams over; it ends with the runtime
    // (the host) or when the server stops listening.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| SimTcpStream(s));
            if tx.send(accepted).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects a simulated TCP stream to `addr` (`host:port`).
pub async fn dial(addr: &str) -> io::Result<turmoil::net::TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, turmoil::net::TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} timed out"),
        )),
    }
}

/// A lazily connected gRPC channel to `addr` (`host:port`) over the
/// simulated network.
pub fn channel(addr: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let target = addr.to_string();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let target = target.clone();
            async move { dial(&target).await.map(hyper_util::rt::TokioIo::new) }
        })),
    )
}
