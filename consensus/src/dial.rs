//! How the Raft transport reaches a peer: a [`Dial`] turns a peer's
//! `host:port` into a byte stream, over which tonic runs HTTP/2.
//!
//! This module owns opening connections — over TCP with `TCP_NODELAY` by
//! default ([`TcpDialer`]), or over whatever a caller plugs in, such as the
//! simulator's in-process network — and bounding each attempt by the
//! transport's connect timeout. It must not speak gRPC, know peers' ids or
//! cache connections: [`crate::grpc_network`] owns channels and decides when
//! to connect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::Uri;
use tower_service::Service;

/// A byte stream to a peer, as a [`Dial`] returns it. Implemented for every
/// suitable type (a `TcpStream`, turmoil's, a duplex pipe).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// What [`Dial::dial`] returns: a connection attempt that owns its inputs.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>>;

/// Opens byte streams to peers for the Raft transport.
///
/// A dialer is called once per connection attempt (the first call to a peer,
/// and each reconnect after the connection broke), never per request. The
/// attempt is cut off after the transport's `connect_timeout_ms`, so a
/// dialer need not bound it itself. An error makes the peer unreachable for
/// that attempt; Raft retries with its backoff.
pub trait Dial: Send + Sync + 'static {
    /// Starts connecting to `addr`, a peer's `host:port` exactly as written
    /// in its `NodeInfo::raft_addr`.
    fn dial(&self, addr: &str) -> DialFuture;
}

/// The production dialer: TCP with Nagle's algorithm off, since Raft
/// messages are small and latency-bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpDialer;

impl Dial for TcpDialer {
    fn dial(&self, addr: &str) -> DialFuture {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = TcpStream::connect(addr.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// The tonic connector of one peer's channel: dials `addr` with `dialer`,
/// bounded by `connect_timeout`. The URI tonic passes is ignored: it is
/// `http://{addr}`, built from the same address.
#[derive(Clone)]
pub(crate) struct DialConnector {
    dialer: Arc<dyn Dial>,
    addr: Arc<str>,
    connect_timeout: Duration,
}

impl DialConnector {
    pub(crate) fn new(dialer: Arc<dyn Dial>, addr: &str, connect_timeout: Duration) -> Self {
        Self {
            dialer,
            addr: Arc::from(addr),
            connect_timeout,
        }
    }
}

impl Service<Uri> for DialConnector {
    type Response = TokioIo<BoxIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<BoxIo>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let attempt = self.dialer.dial(&self.addr);
        let addr = self.addr.clone();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            match tokio::time::timeout(connect_timeout, attempt).await {
                Ok(Ok(io)) => Ok(TokioIo::new(io)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr} took longer than {} ms",
                        connect_timeout.as_millis()
                    ),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dialer whose attempts never finish.
    struct Hang;

    impl Dial for Hang {
        fn dial(&self, _addr: &str) -> DialFuture {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_that_hangs_is_cut_off_at_the_connect_timeout() {
        let mut connector = DialConnector::new(Arc::new(Hang), "peer:1", Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let result = connector.call(Uri::from_static("http://peer:1")).await;
        match result {
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                assert!(e.to_string().contains("peer:1"), "{e}");
            }
            Ok(_) => panic!("a hanging dial must time out"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_tcp_dialer_connects_to_the_address_it_was_given() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let accepted = tokio::spawn(async move { listener.accept().await });
        let mut connector = DialConnector::new(Arc::new(TcpDialer), &addr, Duration::from_secs(5));
        let io = connector
            .call(Uri::from_static("http://ignored.invalid:1"))
            .await
            .expect("dial");
        drop(io);
        accepted.await.expect("accept task").expect("accept");
    }
}
