//! The gossip transport: QUIC DATAGRAM frames between nodes, mutual TLS.
//!
//! Gossip tolerates loss (it has its own acks and anti-entropy), so this
//! layer sends unreliable datagrams rather than streams. Every node is both
//! server and client on one UDP socket. Both sides present certificates from
//! the cluster CA; a node's id is the `node-<id>.tollgate` name in its
//! certificate, so every inbound datagram is tagged with the id the peer
//! proved in the handshake, and a client dialling node `n` only accepts a
//! server that proves it is node `n`.
//!
//! Connections are made lazily on the first send to a peer and redialled
//! when they die; datagrams sent while no connection is up are dropped and
//! reported to the caller, who retries at the gossip level.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use quinn::VarInt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::certs::{TlsMaterial, crypto_provider, node_dns_name, node_id_from_cert};

/// ALPN protocol name of the gossip transport.
pub const ALPN: &[u8] = b"tollgate-gossip/1";
/// A datagram size that fits in every connection on loopback and on paths
/// with a standard 1280+ byte MTU, before path MTU discovery raises the limit.
pub const DEFAULT_MAX_DATAGRAM: usize = 1100;
/// Capacity of the inbound channel; datagrams arriving while it is full are
/// dropped and counted.
pub const INBOUND_CAPACITY: usize = 4096;

/// How long a handshake may take before the attempt is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A peer is not redialled sooner than this after a failed attempt.
const REDIAL_BACKOFF: Duration = Duration::from_millis(200);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that received nothing (not even acks of keep-alives) for
/// this long is presumed dead, e.g. because the peer restarted: another
/// connection is preferred and a redial is started, without waiting for the
/// idle timeout.
const STALE_AFTER: Duration = Duration::from_secs(3);
const FRESHNESS_TICK: Duration = Duration::from_millis(500);
const DATAGRAM_RECEIVE_BUFFER: usize = 1 << 20;

const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_NO_NODE_ID: u32 = 1;
const CLOSE_REPLACED: u32 = 2;
const CLOSE_WRONG_NODE: u32 = 3;

/// Why a datagram was not sent. The datagram is gone in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No connection to the peer is up; one is being made.
    #[error("not connected to the peer (a connection is being made)")]
    NotConnected,
    /// The datagram is larger than the connection can carry.
    #[error("datagram too large: at most {max} bytes fit")]
    TooLarge { max: usize },
    /// Traffic with this peer is dropped by fault injection.
    #[error("traffic with the peer is dropped by fault injection")]
    Dropped,
    /// The peer does not accept datagrams.
    #[error("the peer does not accept datagrams")]
    Unsupported,
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
}

/// One datagram from a peer, tagged with the node id its certificate proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub from: u64,
    pub bytes: Bytes,
}

/// Per-peer transport figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub id: u64,
    /// Whether a connection with the peer is up (in either direction).
    pub connected: bool,
    /// Connections established with the peer so far, both directions.
    pub connections: u64,
    /// UDP payload bytes sent to the peer, over current and past connections
    /// (QUIC headers, handshakes, acks and keep-alives included).
    pub bytes_sent: u64,
    /// UDP payload bytes received from the peer, likewise.
    pub bytes_received: u64,
    /// Datagrams handed to QUIC for the peer.
    pub datagrams_sent: u64,
    /// Datagrams from the peer delivered to the inbound channel.
    pub datagrams_received: u64,
    /// Datagrams for the peer that were not sent (not connected, too large,
    /// fault injection).
    pub datagrams_dropped_out: u64,
    /// Datagrams from the peer that were discarded (inbound channel full or
    /// closed, fault injection).
    pub datagrams_dropped_in: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outgoing,
    Incoming,
}

struct Link {
    conn: quinn::Connection,
    last_rx_bytes: u64,
    last_rx_at: Instant,
}

impl Link {
    fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn fresh(&self, now: Instant) -> bool {
        self.alive() && now.saturating_duration_since(self.last_rx_at) < STALE_AFTER
    }
}

#[derive(Default)]
struct Peer {
    outgoing: Option<Link>,
    incoming: Option<Link>,
    dialing: bool,
    last_dial_end: Option<Instant>,
    dial_failures: u64,
    connections: u64,
    past_tx_bytes: u64,
    past_rx_bytes: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    dropped_out: u64,
    dropped_in: u64,
}

impl Peer {
    fn slot(&mut self, dir: Direction) -> &mut Option<Link> {
        match dir {
            Direction::Outgoing => &mut self.outgoing,
            Direction::Incoming => &mut self.incoming,
        }
    }

    /// The connection to send on: a fresh one, else any live one; of two,
    /// the one the lower node id dialled, so both sides send on the same
    /// connection and QUIC's acks ride on data going the other way.
    fn pick(&self, now: Instant, outgoing_first: bool) -> Option<&quinn::Connection> {
        let links = if outgoing_first {
            [self.outgoing.as_ref(), self.incoming.as_ref()]
        } else {
            [self.incoming.as_ref(), self.outgoing.as_ref()]
        };
        links
            .iter()
            .flatten()
            .find(|l| l.fresh(now))
            .or_else(|| links.iter().flatten().find(|l| l.alive()))
            .map(|l| &l.conn)
    }

    /// Folds a finished connection's wire figures into the totals.
    fn account(&mut self, conn: &quinn::Connection) {
        let stats = conn.stats();
        self.past_tx_bytes += stats.udp_tx.bytes;
        self.past_rx_bytes += stats.udp_rx.bytes;
    }
}

struct Inner {
    node_id: u64,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    local_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    peers: Mutex<BTreeMap<u64, Peer>>,
    dropped: RwLock<BTreeSet<u64>>,
    inbound: mpsc::Sender<Inbound>,
    closed: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
    }
}

/// The gossip transport of one node. Cheap to clone; the endpoint is closed
/// by [`QuicTransport::close`] or when the last clone is dropped.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("node_id", &self.inner.node_id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// The UDP socket a [`QuicTransport`] runs on.
pub enum GossipSocket {
    /// An OS socket, driven by Tokio.
    Std(std::net::UdpSocket),
    /// Any socket and runtime quinn can drive (the simulator's), with the
    /// seed of quinn's own random choices (connection ids, tokens).
    Abstract {
        /// The socket.
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        /// Timers, spawning and the clock.
        runtime: Arc<dyn quinn::Runtime>,
        /// Seed for quinn's random choices; `None` draws from the OS.
        rng_seed: Option<[u8; 32]>,
    },
}

impl QuicTransport {
    /// Binds the endpoint on `socket` (already bound, so callers pick the
    /// port), acting as both server and client with mutual TLS from `tls`.
    /// Must be called inside a Tokio runtime. The certificate in `tls` must
    /// be node `node_id`'s.
    pub fn bind(
        socket: std::net::UdpSocket,
        node_id: u64,
        tls: &TlsMaterial,
    ) -> anyhow::Result<(Self, mpsc::Receiver<Inbound>)> {
        Self::bind_socket(GossipSocket::Std(socket), node_id, tls)
    }

    /// [`QuicTransport::bind`] on any socket quinn can drive, e.g. the
    /// simulator's.
    pub fn bind_socket(
        socket: GossipSocket,
        node_id: u64,
        tls: &TlsMaterial,
    ) -> anyhow::Result<(Self, mpsc::Receiver<Inbound>)> {
        match tls.node_id() {
            Some(id) if id == node_id => {}
            Some(id) => bail!(
                "{} is the certificate of node {id}, not of node {node_id}",
                tls.cert_path().display()
            ),
            None => bail!(
                "{} carries no node id (DNS name {})",
                tls.cert_path().display(),
                node_dns_name(node_id)
            ),
        }
        let runtime = tokio::runtime::Handle::try_current()
            .context("the gossip transport must be bound inside a Tokio runtime")?;
        let provider = crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in tls.ca_certs() {
            roots
                .add(cert.clone())
                .context("adding a CA certificate to the trust roots")?;
        }
        let roots = Arc::new(roots);
        let transport = Arc::new(transport_config()?);

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .context("building the client certificate verifier")?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("enabling TLS 1.3")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(tls.cert_chain().to_vec(), tls.private_key())
            .context("loading the node certificate for the server side")?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let server_crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| anyhow!("server TLS config unusable for QUIC: {e}"))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());

        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("enabling TLS 1.3")?
            .with_root_certificates(roots)
            .with_client_auth_cert(tls.cert_chain().to_vec(), tls.private_key())
            .context("loading the node certificate for the client side")?;
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        let client_crypto = QuicClientConfig::try_from(client_tls)
            .map_err(|e| anyhow!("client TLS config unusable for QUIC: {e}"))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport);

        let endpoint = match socket {
            GossipSocket::Std(socket) => {
                socket
                    .set_nonblocking(true)
                    .context("making the gossip socket non-blocking")?;
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            }
            GossipSocket::Abstract {
                socket,
                runtime,
                rng_seed,
            } => {
                let mut config = quinn::EndpointConfig::default();
                config.rng_seed(rng_seed);
                quinn::Endpoint::new_with_abstract_socket(
                    config,
                    Some(server_config),
                    socket,
                    runtime,
                )
            }
        }
        .context("starting the QUIC endpoint")?;
        let local_addr = endpoint
            .local_addr()
            .context("reading the gossip socket address")?;
        let (tx, rx) = mpsc::channel(INBOUND_CAPACITY);
        let inner = Arc::new(Inner {
            node_id,
            endpoint: endpoint.clone(),
            client_config,
            local_addr,
            runtime: runtime.clone(),
            peers: Mutex::new(BTreeMap::new()),
            dropped: RwLock::new(BTreeSet::new()),
            inbound: tx,
            closed: AtomicBool::new(false),
        });
        runtime.spawn(accept_loop(endpoint, Arc::downgrade(&inner)));
        tracing::debug!(node_id, %local_addr, "gossip transport bound");
        Ok((Self { inner }, rx))
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Sends one datagram to peer `to` at `addr` without waiting.
    ///
    /// Without a connection to the peer, one is started in the background
    /// (at most one attempt at a time, and not sooner than ~200 ms after a
    /// failed one) and the datagram is dropped with
    /// [`SendError::NotConnected`]. A connection to another address than
    /// `addr` (the peer moved) is replaced the same way.
    pub fn send(&self, to: u64, addr: SocketAddr, bytes: Bytes) -> Result<(), SendError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let now = Instant::now();
        let mut peers = inner.peers.lock();
        let peer = peers.entry(to).or_default();
        if inner.dropped.read().contains(&to) {
            peer.dropped_out += 1;
            return Err(SendError::Dropped);
        }
        let usable = |link: &Option<Link>| {
            link.as_ref()
                .is_some_and(|l| l.fresh(now) && same_addr(l.conn.remote_address(), addr))
        };
        // One connection per pair is enough: dial only when neither
        // direction has a fresh one to the peer's current address.
        if !usable(&peer.outgoing) && !usable(&peer.incoming) {
            inner.maybe_dial(peer, to, addr, now);
        }
        let Some(conn) = peer.pick(now, inner.node_id < to).cloned() else {
            peer.dropped_out += 1;
            return Err(SendError::NotConnected);
        };
        send_datagram(peer, &conn, bytes)
    }

    /// Sends one datagram to `to` on a connection that is already up,
    /// without dialling: an answer to a node that is no longer a member
    /// (its address is not known here, and it is leaving anyway).
    pub fn reply(&self, to: u64, bytes: Bytes) -> Result<(), SendError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let now = Instant::now();
        let mut peers = inner.peers.lock();
        let Some(peer) = peers.get_mut(&to) else {
            return Err(SendError::NotConnected);
        };
        if inner.dropped.read().contains(&to) {
            peer.dropped_out += 1;
            return Err(SendError::Dropped);
        }
        let Some(conn) = peer.pick(now, inner.node_id < to).cloned() else {
            peer.dropped_out += 1;
            return Err(SendError::NotConnected);
        };
        send_datagram(peer, &conn, bytes)
    }

    /// The largest datagram currently sendable to `to`, None if no
    /// connection to it is up. Batches should be sized with this; it can
    /// grow as path MTU discovery progresses.
    pub fn max_datagram(&self, to: u64) -> Option<usize> {
        let now = Instant::now();
        let peers = self.inner.peers.lock();
        peers
            .get(&to)?
            .pick(now, self.inner.node_id < to)?
            .max_datagram_size()
    }

    /// Per-peer figures, ordered by peer id.
    pub fn stats(&self) -> Vec<PeerStats> {
        let peers = self.inner.peers.lock();
        let mut out: Vec<PeerStats> = peers
            .iter()
            .map(|(&id, peer)| {
                let mut stats = PeerStats {
                    id,
                    connected: false,
                    connections: peer.connections,
                    bytes_sent: peer.past_tx_bytes,
                    bytes_received: peer.past_rx_bytes,
                    datagrams_sent: peer.datagrams_sent,
                    datagrams_received: peer.datagrams_received,
                    datagrams_dropped_out: peer.dropped_out,
                    datagrams_dropped_in: peer.dropped_in,
                };
                for link in [&peer.outgoing, &peer.incoming].into_iter().flatten() {
                    stats.connected |= link.alive();
                    let wire = link.conn.stats();
                    stats.bytes_sent += wire.udp_tx.bytes;
                    stats.bytes_received += wire.udp_rx.bytes;
                }
                stats
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Fault injection: drops all datagrams to and from these peers at this
    /// node until changed; an empty set heals. Connections stay up (QUIC
    /// keep-alives still flow), so healing takes effect at once.
    pub fn set_dropped(&self, peers: BTreeSet<u64>) {
        tracing::info!(node_id = self.inner.node_id, dropped = ?peers, "gossip fault injection");
        *self.inner.dropped.write() = peers;
    }

    /// The peers currently dropped by fault injection.
    pub fn dropped(&self) -> BTreeSet<u64> {
        self.inner.dropped.read().clone()
    }

    /// Closes the endpoint and all connections, telling peers, and waits
    /// (briefly) for the closes to go out. Later sends fail with
    /// [`SendError::Closed`].
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    /// Starts a connection attempt to `to` unless one is under way or the
    /// last one failed less than [`REDIAL_BACKOFF`] ago. Called with the
    /// peers lock held.
    fn maybe_dial(self: &Arc<Self>, peer: &mut Peer, to: u64, addr: SocketAddr, now: Instant) {
        if peer.dialing || self.closed.load(Ordering::Acquire) {
            return;
        }
        if peer
            .last_dial_end
            .is_some_and(|t| now.saturating_duration_since(t) < REDIAL_BACKOFF)
        {
            return;
        }
        peer.dialing = true;
        self.runtime.spawn(dial(
            Arc::downgrade(self),
            self.endpoint.clone(),
            self.client_config.clone(),
            to,
            addr,
        ));
    }

    fn dial_failed(&self, to: u64, addr: SocketAddr, error: &str) {
        let mut peers = self.peers.lock();
        let peer = peers.entry(to).or_default();
        peer.dialing = false;
        peer.last_dial_end = Some(Instant::now());
        peer.dial_failures += 1;
        if peer.dial_failures == 1 {
            tracing::warn!(node_id = self.node_id, peer = to, %addr, error, "cannot connect to gossip peer; retrying");
        } else {
            tracing::debug!(node_id = self.node_id, peer = to, %addr, error, attempt = peer.dial_failures, "cannot connect to gossip peer");
        }
    }

    /// Makes `conn` the peer's connection in direction `dir`, replacing (and
    /// closing) an older one, and starts reading from it.
    fn register(self: &Arc<Self>, peer_id: u64, dir: Direction, conn: quinn::Connection) {
        if self.closed.load(Ordering::Acquire) {
            conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
            return;
        }
        let link = Link {
            last_rx_bytes: conn.stats().udp_rx.bytes,
            last_rx_at: Instant::now(),
            conn: conn.clone(),
        };
        let old = {
            let mut peers = self.peers.lock();
            let peer = peers.entry(peer_id).or_default();
            peer.connections += 1;
            if dir == Direction::Outgoing {
                peer.dialing = false;
                peer.last_dial_end = Some(Instant::now());
                peer.dial_failures = 0;
            }
            // A peer dials only when it has no fresh connection to this node:
            // a new incoming connection while ours to it looks alive most
            // likely means the peer restarted and ours is dead, its packets
            // dropped until STALE_AFTER or the idle timeout. It stops being
            // preferred now; if the peer still answers on it, the next
            // freshness tick makes it fresh again.
            if dir == Direction::Incoming
                && let Some(out) = peer.outgoing.as_mut()
                && let Some(stale) = Instant::now().checked_sub(STALE_AFTER)
            {
                out.last_rx_at = out.last_rx_at.min(stale);
            }
            let old = peer.slot(dir).replace(link);
            if let Some(old) = &old {
                peer.account(&old.conn);
            }
            old
        };
        if let Some(old) = old {
            old.conn.close(
                VarInt::from_u32(CLOSE_REPLACED),
                b"replaced by a newer connection",
            );
        }
        tracing::debug!(node_id = self.node_id, peer = peer_id, ?dir, remote = %conn.remote_address(), "gossip connection up");
        self.runtime
            .spawn(read_loop(Arc::downgrade(self), peer_id, dir, conn));
    }

    /// Drops `conn` from its slot after it ended, keeping its figures.
    fn retire(&self, peer_id: u64, dir: Direction, conn: &quinn::Connection) {
        let mut peers = self.peers.lock();
        let Some(peer) = peers.get_mut(&peer_id) else {
            return;
        };
        let slot = peer.slot(dir);
        if slot
            .as_ref()
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
        {
            *slot = None;
            peer.account(conn);
        }
    }

    /// Notes whether `conn` received anything since the last look.
    fn refresh(&self, peer_id: u64, dir: Direction, conn: &quinn::Connection) {
        let rx = conn.stats().udp_rx.bytes;
        let mut peers = self.peers.lock();
        if let Some(link) = peers
            .get_mut(&peer_id)
            .and_then(|p| p.slot(dir).as_mut())
            .filter(|l| l.conn.stable_id() == conn.stable_id())
            && link.last_rx_bytes != rx
        {
            link.last_rx_bytes = rx;
            link.last_rx_at = Instant::now();
        }
    }

    fn deliver(&self, from: u64, bytes: Bytes) {
        let delivered = !self.dropped.read().contains(&from)
            && self.inbound.try_send(Inbound { from, bytes }).is_ok();
        let mut peers = self.peers.lock();
        let peer = peers.entry(from).or_default();
        if delivered {
            peer.datagrams_received += 1;
        } else {
            peer.dropped_in += 1;
        }
    }
}

/// Hands one datagram to `conn`, counting it on `peer`.
fn send_datagram(peer: &mut Peer, conn: &quinn::Connection, bytes: Bytes) -> Result<(), SendError> {
    match conn.send_datagram(bytes) {
        Ok(()) => {
            peer.datagrams_sent += 1;
            Ok(())
        }
        Err(e) => {
            peer.dropped_out += 1;
            Err(match e {
                quinn::SendDatagramError::TooLarge => SendError::TooLarge {
                    max: conn.max_datagram_size().unwrap_or(0),
                },
                quinn::SendDatagramError::ConnectionLost(_) => SendError::NotConnected,
                quinn::SendDatagramError::UnsupportedByPeer
                | quinn::SendDatagramError::Disabled => SendError::Unsupported,
            })
        }
    }
}

fn transport_config() -> anyhow::Result<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).context("idle timeout out of range")?,
        ));
    // Gossip datagrams are unreliable by design (the protocol acks and
    // resends what matters), so QUIC's own acks only serve congestion
    // control: ask the peer to ack every few packets or after its delay
    // (at most 25 ms here) instead of every other packet. At steady gossip
    // load this removes most ack-only packets from the wire.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(8))
        .max_ack_delay(Some(Duration::from_millis(25)));
    config.ack_frequency_config(Some(acks));
    Ok(config)
}

/// The node id the peer's certificate proved in the handshake.
fn peer_node_id(conn: &quinn::Connection) -> Option<u64> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_id_from_cert(chain.first()?)
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

async fn accept_loop(endpoint: quinn::Endpoint, inner: Weak<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(strong) = inner.upgrade() else {
            incoming.refuse();
            break;
        };
        if strong.closed.load(Ordering::Acquire) {
            incoming.refuse();
            continue;
        }
        strong.runtime.spawn(accept_one(inner.clone(), incoming));
    }
}

async fn accept_one(inner: Weak<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let result = match incoming.accept() {
        Ok(connecting) => match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("handshake timed out".to_owned()),
        },
        Err(e) => Err(e.to_string()),
    };
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let conn = match result {
        Ok(conn) => conn,
        Err(error) => {
            tracing::debug!(node_id = inner.node_id, %remote, error, "gossip handshake from a peer failed");
            return;
        }
    };
    let Some(peer_id) = peer_node_id(&conn) else {
        tracing::warn!(node_id = inner.node_id, %remote, "gossip peer's certificate carries no node id; closing");
        conn.close(
            VarInt::from_u32(CLOSE_NO_NODE_ID),
            b"certificate carries no node id",
        );
        return;
    };
    inner.register(peer_id, Direction::Incoming, conn);
}

async fn dial(
    inner: Weak<Inner>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    to: u64,
    addr: SocketAddr,
) {
    let server_name = node_dns_name(to);
    let result = match endpoint.connect_with(config, addr, &server_name) {
        Ok(connecting) => match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("handshake timed out".to_owned()),
        },
        Err(e) => Err(e.to_string()),
    };
    let Some(inner) = inner.upgrade() else {
        if let Ok(conn) = result {
            conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        }
        return;
    };
    match result {
        // The server name already bound the certificate to `to`; checked
        // again so a certificate naming several nodes cannot pass.
        Ok(conn) => match peer_node_id(&conn) {
            Some(id) if id == to => inner.register(to, Direction::Outgoing, conn),
            other => {
                conn.close(
                    VarInt::from_u32(CLOSE_WRONG_NODE),
                    b"certificate is not the expected node's",
                );
                let error = format!("peer proved node id {other:?}, expected {to}");
                inner.dial_failed(to, addr, &error);
            }
        },
        Err(error) => inner.dial_failed(to, addr, &error),
    }
}

async fn read_loop(inner: Weak<Inner>, peer_id: u64, dir: Direction, conn: quinn::Connection) {
    let mut tick = tokio::time::interval(FRESHNESS_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let reason = loop {
        tokio::select! {
            read = conn.read_datagram() => match read {
                Ok(bytes) => match inner.upgrade() {
                    Some(inner) => inner.deliver(peer_id, bytes),
                    None => break "transport dropped".to_owned(),
                },
                Err(e) => break e.to_string(),
            },
            _ = tick.tick() => match inner.upgrade() {
                Some(inner) => inner.refresh(peer_id, dir, &conn),
                None => break "transport dropped".to_owned(),
            },
        }
    };
    if let Some(inner) = inner.upgrade() {
        tracing::debug!(
            node_id = inner.node_id,
            peer = peer_id,
            ?dir,
            reason,
            "gossip connection ended"
        );
        inner.retire(peer_id, dir, &conn);
    }
}
