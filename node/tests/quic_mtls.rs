//! The gossip transport over real loopback sockets: mutual TLS with the
//! cluster CA, node ids from certificates, fault injection, restarts.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::Receiver;
use tollgate_node::certs::{self, TlsFiles, TlsMaterial};
use tollgate_node::quic::{DEFAULT_MAX_DATAGRAM, Inbound, QuicTransport, SendError};

/// How often a test re-sends while it waits for a datagram.
const RESEND: Duration = Duration::from_millis(20);

struct Node {
    id: u64,
    transport: QuicTransport,
    rx: Receiver<Inbound>,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }
}

fn bind_files(id: u64, files: &TlsFiles) -> Node {
    let tls = TlsMaterial::load(files).expect("load TLS material");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let (transport, rx) = QuicTransport::bind(socket, id, &tls).expect("bind transport");
    Node { id, transport, rx }
}

fn bind(dir: &Path, id: u64) -> Node {
    bind_files(id, &certs::node_files(dir, id))
}

/// Sends `payload` from `from` to `to` every [`RESEND`] until `to` receives
/// it or `within` passes; returns what arrived.
async fn deliver(from: &Node, to: &mut Node, payload: &[u8], within: Duration) -> Option<Inbound> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let _ = from
            .transport
            .send(to.id, to.addr(), Bytes::copy_from_slice(payload));
        let wait_until = tokio::time::Instant::now() + RESEND;
        while let Ok(Some(inbound)) = tokio::time::timeout_at(wait_until, to.rx.recv()).await {
            if inbound.bytes.as_ref() == payload {
                return Some(inbound);
            }
        }
    }
    None
}

async fn must_deliver(from: &Node, to: &mut Node, payload: &[u8]) -> Inbound {
    deliver(from, to, payload, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("{} -> {}: {:?} never arrived", from.id, to.id, payload))
}

fn peer_stats(node: &Node, peer: u64) -> tollgate_node::quic::PeerStats {
    node.transport
        .stats()
        .into_iter()
        .find(|s| s.id == peer)
        .unwrap_or_else(|| panic!("node {} has no stats for peer {peer}", node.id))
}

#[tokio::test]
async fn datagrams_flow_both_ways_tagged_with_the_sender_id() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &[1, 2]).unwrap();
    let mut a = bind(dir.path(), 1);
    let mut b = bind(dir.path(), 2);

    // Nothing is connected before the first send; that send starts a dial.
    assert_eq!(a.transport.max_datagram(2), None);
    assert_eq!(
        a.transport.send(2, b.addr(), Bytes::from_static(b"early")),
        Err(SendError::NotConnected)
    );

    let got = must_deliver(&a, &mut b, b"hello from 1").await;
    assert_eq!(got.from, 1);
    let got = must_deliver(&b, &mut a, b"hello from 2").await;
    assert_eq!(got.from, 2);

    // Batches sized with DEFAULT_MAX_DATAGRAM fit; a datagram over the
    // connection's limit is refused with the limit (which path MTU discovery
    // may have raised meanwhile, so only its range is checked).
    let max = a.transport.max_datagram(2).expect("connected");
    assert!(max >= DEFAULT_MAX_DATAGRAM, "max datagram {max}");
    let full = vec![7u8; DEFAULT_MAX_DATAGRAM];
    let got = must_deliver(&a, &mut b, &full).await;
    assert_eq!(got.from, 1);
    match a
        .transport
        .send(2, b.addr(), Bytes::from(vec![0u8; 65_536]))
    {
        Err(SendError::TooLarge { max }) => {
            assert!((DEFAULT_MAX_DATAGRAM..65_536).contains(&max), "{max}")
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }

    let stats = peer_stats(&a, 2);
    assert!(stats.connected);
    assert!(
        stats.bytes_sent > 0 && stats.bytes_received > 0,
        "{stats:?}"
    );
    assert!(stats.datagrams_sent >= 2, "{stats:?}");
    assert!(stats.datagrams_received >= 1, "{stats:?}");
    assert!(stats.datagrams_dropped_out >= 2, "{stats:?}");
    let stats = peer_stats(&b, 1);
    assert!(
        stats.bytes_sent > 0 && stats.bytes_received > 0,
        "{stats:?}"
    );
    assert!(stats.datagrams_received >= 2, "{stats:?}");
    // Stats serialize for the admin API.
    let json = serde_json::to_value(a.transport.stats()).unwrap();
    assert_eq!(json[0]["id"], 2);

    a.transport.close().await;
    b.transport.close().await;
    assert_eq!(
        a.transport.send(2, b.addr(), Bytes::from_static(b"late")),
        Err(SendError::Closed)
    );
}

#[tokio::test]
async fn a_node_with_a_cert_from_another_ca_cannot_join_gossip() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    certs::init(ours.path(), &[1, 2]).unwrap();
    certs::init(theirs.path(), &[3, 4]).unwrap();
    let mut a = bind(ours.path(), 1);
    let mut b = bind(ours.path(), 2);
    // Node 3 is wholly from the other CA: each side rejects the other's
    // server certificate.
    let mut c = bind(theirs.path(), 3);
    // Node 4 trusts our CA but holds a certificate from the other one: our
    // server must reject its client certificate.
    let mut d = bind_files(
        4,
        &TlsFiles {
            ca: certs::node_files(ours.path(), 4).ca,
            ..certs::node_files(theirs.path(), 4)
        },
    );

    // Both directions, both foreign nodes, re-sent for two seconds.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for (to, addr) in [(3, c.addr()), (4, d.addr())] {
            let _ = a.transport.send(to, addr, Bytes::from_static(b"secret"));
        }
        let _ = c
            .transport
            .send(1, a.addr(), Bytes::from_static(b"let me in"));
        let _ = d
            .transport
            .send(1, a.addr(), Bytes::from_static(b"let me in"));
        tokio::time::sleep(RESEND).await;
        if let Ok(inbound) = a.rx.try_recv() {
            panic!("node 1 got {inbound:?} from a foreign node");
        }
        assert!(c.rx.try_recv().is_err(), "node 3 got a datagram");
        assert!(d.rx.try_recv().is_err(), "node 4 got a datagram");
    }
    for (node, peer) in [(&a, 3), (&a, 4), (&c, 1), (&d, 1)] {
        let stats = peer_stats(node, peer);
        assert!(!stats.connected, "node {} to {peer}: {stats:?}", node.id);
        assert_eq!(stats.datagrams_received, 0);
    }
    // Node 1 never completed a handshake with either, in either direction.
    assert_eq!(peer_stats(&a, 3).connections, 0);
    assert_eq!(peer_stats(&a, 4).connections, 0);

    // Nodes 1 and 2 still talk.
    assert_eq!(must_deliver(&a, &mut b, b"ping").await.from, 1);
    assert_eq!(must_deliver(&b, &mut a, b"pong").await.from, 2);
}

#[tokio::test]
async fn fault_injection_drops_both_directions_until_healed() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &[1, 2]).unwrap();
    let mut a = bind(dir.path(), 1);
    let mut b = bind(dir.path(), 2);
    must_deliver(&a, &mut b, b"warm up").await;
    must_deliver(&b, &mut a, b"warm up").await;

    a.transport.set_dropped(BTreeSet::from([2]));
    assert_eq!(a.transport.dropped(), BTreeSet::from([2]));
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_eq!(
            a.transport
                .send(2, b.addr(), Bytes::from_static(b"cut off")),
            Err(SendError::Dropped)
        );
        // Node 2 does not know; its sends leave, and node 1 discards them.
        assert_eq!(
            b.transport
                .send(1, a.addr(), Bytes::from_static(b"anyone?")),
            Ok(())
        );
        tokio::time::sleep(RESEND).await;
        assert!(a.rx.try_recv().is_err(), "node 1 got a datagram from 2");
        assert!(b.rx.try_recv().is_err(), "node 2 got a datagram from 1");
    }
    let stats = peer_stats(&a, 2);
    assert!(stats.datagrams_dropped_in > 0, "{stats:?}");
    assert!(stats.datagrams_dropped_out > 0, "{stats:?}");
    // The connection itself stays up, so healing is immediate.
    assert!(stats.connected, "{stats:?}");

    a.transport.set_dropped(BTreeSet::new());
    assert!(a.transport.dropped().is_empty());
    assert_eq!(must_deliver(&b, &mut a, b"healed").await.from, 2);
    assert_eq!(must_deliver(&a, &mut b, b"healed").await.from, 1);
}

#[tokio::test]
async fn init_rerun_adds_a_node_signed_by_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = certs::init(dir.path(), &[1]).unwrap();
    assert!(first.ca_created && first.nodes[0].created);
    let ca_before = std::fs::read(&first.ca).unwrap();
    let key_before = std::fs::read(&first.nodes[0].files.key).unwrap();
    let mut a = bind(dir.path(), 1);

    let second = certs::init(dir.path(), &[1, 5]).unwrap();
    assert!(!second.ca_created);
    assert!(!second.nodes[0].created);
    assert!(second.nodes[1].created);
    assert_eq!(second.nodes[1].files, certs::node_files(dir.path(), 5));
    assert_eq!(std::fs::read(&second.ca).unwrap(), ca_before);
    assert_eq!(
        std::fs::read(&second.nodes[0].files.key).unwrap(),
        key_before
    );

    let mut e = bind(dir.path(), 5);
    assert_eq!(must_deliver(&e, &mut a, b"new here").await.from, 5);
    assert_eq!(must_deliver(&a, &mut e, b"welcome").await.from, 1);
}

#[tokio::test]
async fn a_cert_without_a_node_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths = certs::init(dir.path(), &[1]).unwrap();
    let mut a = bind(dir.path(), 1);

    // A certificate from the right CA that names no node.
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&paths.ca_key).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&paths.ca).unwrap(), ca_key)
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = TlsFiles {
        ca: paths.ca.clone(),
        cert: dir.path().join("anon.pem"),
        key: dir.path().join("anon.key"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let tls = TlsMaterial::load(&files).unwrap();
    assert_eq!(tls.node_id(), None);

    // The transport will not run with it...
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = QuicTransport::bind(socket, 9, &tls)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no node id"), "{err}");
    // ...nor with another node's certificate.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other = TlsMaterial::load(&certs::node_files(dir.path(), 1)).unwrap();
    let err = QuicTransport::bind(socket, 2, &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("node 1"), "{err}");

    // A hand-made client with it completes TLS, and node 1 closes the
    // connection since it cannot tell which node is speaking.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in tls.ca_certs() {
        roots.add(ca.clone()).unwrap();
    }
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(tls.cert_chain().to_vec(), tls.private_key())
        .unwrap();
    client_tls.alpn_protocols = vec![tollgate_node::quic::ALPN.to_vec()];
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(client_config, a.addr(), "node-1.tollgate")
        .unwrap()
        .await
        .expect("TLS with the right CA succeeds");
    let _ = conn.send_datagram(Bytes::from_static(b"who am I"));
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("node 1 closes the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(1), "{close:?}")
        }
        other => panic!("unexpected close: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        a.rx.try_recv().is_err(),
        "an anonymous datagram was delivered"
    );
    endpoint.close(quinn::VarInt::from_u32(0), b"");
}

#[tokio::test]
async fn a_restarted_peer_is_redialled() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &[1, 2]).unwrap();
    let mut a = bind(dir.path(), 1);
    let mut b = bind(dir.path(), 2);
    must_deliver(&a, &mut b, b"before").await;
    must_deliver(&b, &mut a, b"before").await;
    let before = peer_stats(&a, 2);

    // Node 2 stops and comes back on the same address.
    let addr = b.addr();
    b.transport.close().await;
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    let socket = loop {
        match UdpSocket::bind(addr) {
            Ok(socket) => break socket,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(RESEND).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    let tls = TlsMaterial::load(&certs::node_files(dir.path(), 2)).unwrap();
    let (transport, rx) = QuicTransport::bind(socket, 2, &tls).unwrap();
    let mut b = Node {
        id: 2,
        transport,
        rx,
    };

    assert_eq!(must_deliver(&a, &mut b, b"after").await.from, 1);
    assert_eq!(must_deliver(&b, &mut a, b"after").await.from, 2);
    let after = peer_stats(&a, 2);
    assert!(
        after.connections > before.connections,
        "{before:?} {after:?}"
    );
    // Wire figures include the connections that are gone.
    assert!(after.bytes_sent > before.bytes_sent, "{before:?} {after:?}");
    assert!(
        after.bytes_received > before.bytes_received,
        "{before:?} {after:?}"
    );
}

/// A UDP relay between node 1 and whichever node 2 is current, so a test can
/// make the old node 2 vanish without it saying goodbye (as a crash would).
struct Relay {
    addr: SocketAddr,
    target: Arc<parking_lot::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(client: SocketAddr, target: SocketAddr) -> Relay {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let target = Arc::new(parking_lot::Mutex::new(target));
        let current = target.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let to = *current.lock();
                let dest = if from == client {
                    to
                } else if from == to {
                    client
                } else {
                    continue; // the vanished node
                };
                let _ = socket.send_to(&buf[..n], dest).await;
            }
        });
        Relay { addr, target, task }
    }
}

#[tokio::test]
async fn a_peer_that_vanished_without_closing_is_redialled_before_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &[1, 2]).unwrap();
    let a = bind(dir.path(), 1);
    let mut old = bind(dir.path(), 2);
    let relay = Relay::start(a.addr(), old.addr()).await;
    // Node 1 reaches node 2 only through the relay.
    let send =
        |payload: &'static [u8]| a.transport.send(2, relay.addr, Bytes::from_static(payload));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = send(b"before");
        if let Ok(Some(got)) = tokio::time::timeout(RESEND, old.rx.recv()).await {
            assert_eq!(got.from, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 never reached through the relay"
        );
    }

    // Node 2 "crashes": its packets stop, and a new node 2 answers at the
    // same address (the relay's).
    let mut new = bind(dir.path(), 2);
    *relay.target.lock() = new.addr();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(9);
    loop {
        let _ = send(b"after");
        if let Ok(Some(got)) = tokio::time::timeout(RESEND, new.rx.recv()).await {
            assert_eq!(got.from, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new node 2 was not reached before the idle timeout"
        );
    }
    assert!(peer_stats(&a, 2).connections >= 2);
    eprintln!("new node 2 reached after {:?}", started.elapsed());
    relay.task.abort();
}
