//! A webhook receiver for alert tests: a small HTTP server on loopback that
//! records every request and answers 500 to the first `n_failures`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `X-Tollgate-Event` header.
    pub event: Option<String>,
    /// The `X-Tollgate-Signature` header.
    pub signature: Option<String>,
    /// The status the receiver answered.
    pub status: u16,
    /// The body as JSON (`Null` if it was not JSON).
    pub body: serde_json::Value,
    /// The body as sent.
    pub raw: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    n_failures: usize,
    received: Vec<Received>,
}

/// A running receiver.
pub struct Receiver {
    /// Where it listens: `http://127.0.0.1:PORT/hook`.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    /// Starts a receiver that answers 500 to its first `n_failures` requests
    /// and 200 after.
    pub async fn start(n_failures: usize) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            n_failures,
            received: Vec::new(),
        }));
        let router = Router::new()
            .route("/hook", post(receive))
            .with_state(Arc::clone(&inner));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            url: format!("http://{addr}/hook"),
            inner,
            stop: Some(stop),
        })
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner
            .lock()
            .map(|i| i.received.clone())
            .unwrap_or_default()
    }

    /// Polls until `done` holds for the requests received, or `timeout`
    /// passes; returns the requests either way.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.received();
            if done(&got) || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Ok(mut inner) = inner.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let status = if inner.received.len() < inner.n_failures {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    inner.received.push(Received {
        idempotency_key: header("idempotency-key"),
        event: header("x-tollgate-event"),
        signature: header("x-tollgate-signature"),
        status: status.as_u16(),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        raw: body.to_vec(),
    });
    status
}
