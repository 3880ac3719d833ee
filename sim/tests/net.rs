//! quinn and tonic on turmoil's simulated network: QUIC datagrams and
//! streams between hosts and around a partition, quinn's clock and timers on
//! simulated time, a QUIC exchange replayed from its seed, a datagram to
//! nowhere, and gRPC calls between hosts and under a partition.
//!
//! Every simulation is seeded. A failure names the seed and the command that
//! runs the test again.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, ConnectionError, Runtime, TransportConfig, UdpPoller};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::{timeout, timeout_at};
use tollgate_proto::v1::RaftMessage;
use tollgate_proto::v1::raft_client::RaftClient;
use tollgate_proto::v1::raft_server::{Raft, RaftServer};
use tollgate_sim::net::{SimQuinnRuntime, SimUdpSocket, bind_udp, channel, incoming};
use tonic::{Request, Response, Status};

const SERVER: &str = "server";
const CLIENT: &str = "client";
const QUIC_PORT: u16 = 4433;
const GRPC_PORT: u16 = 50051;
const ALPN: &[u8] = b"tollgate-sim-test/1";
/// How long a reply to one datagram may take on turmoil's default links
/// (latency 0 to 100 ms each way).
const REPLY_WAIT: Duration = Duration::from_millis(250);
/// The most a stream echo may carry back.
const MAX_ECHO: usize = 1 << 20;

/// Runs a simulation and, if it fails, says which seed and how to rerun it.
fn run(test: &str, seed: u64, sim: &mut turmoil::Sim<'_>) -> anyhow::Result<()> {
    sim.run().map_err(|error| {
        anyhow!(
            "simulation failed with seed {seed}: {error}\n\
             reproduce: cargo test -p tollgate-sim --test net {test}"
        )
    })
}

/// The seed of an endpoint's generator, derived from the simulation's seed
/// so that one number replays everything.
fn endpoint_seed(sim_seed: u64, host: &str) -> u64 {
    match host {
        SERVER => sim_seed.wrapping_mul(2),
        _ => sim_seed.wrapping_mul(2).wrapping_add(1),
    }
}

/// An endpoint config whose generator is seeded, as the simulator seeds a
/// node's gossip endpoint.
fn endpoint_config(seed: u64) -> quinn::EndpointConfig {
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    let mut config = quinn::EndpointConfig::default();
    config.rng_seed(Some(rng_seed));
    config
}

fn builder(seed: u64) -> turmoil::Builder {
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60));
    builder
}

/// QUIC configs for a server named `SERVER`, with an Ed25519 self-signed
/// certificate the client trusts. Ed25519 signatures have a fixed length
/// and the serial number is fixed, so the handshake has the same size in
/// every run. (The DER encoding of an ECDSA signature varies by a byte or
/// two from run to run, and so can the size of a datagram that carries
/// the handshake.)
fn quic_configs(
    transport: TransportConfig,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER.to_string()])?;
    params.serial_number = Some(rcgen::SerialNumber::from(1u64));
    let cert: CertificateDer<'static> = params.self_signed(&key)?.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(transport);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server.transport_config(Arc::clone(&transport));
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);
    Ok((server, client))
}

fn transport(
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
) -> anyhow::Result<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into()?));
    transport.keep_alive_interval(keep_alive);
    Ok(transport)
}

fn endpoint(
    seed: u64,
    server: Option<quinn::ServerConfig>,
    socket: Arc<dyn AsyncUdpSocket>,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(seed),
        server,
        socket,
        Arc::new(SimQuinnRuntime),
    )
}

fn server_quic_addr() -> SocketAddr {
    SocketAddr::new(turmoil::lookup(SERVER), QUIC_PORT)
}

fn any_port(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// What happened in a simulation and when, in simulated time.
#[derive(Clone, Debug, Default)]
struct Trace(Arc<Mutex<Vec<(Duration, String)>>>);

impl Trace {
    fn record(&self, host: &str, event: impl Into<String>) {
        let at = turmoil::sim_elapsed().expect("recorded inside the simulation");
        let event = format!("{host}: {}", event.into());
        self.0.lock().expect("trace lock").push((at, event));
    }

    fn take(&self) -> Vec<(Duration, String)> {
        std::mem::take(&mut *self.0.lock().expect("trace lock"))
    }
}

/// A simulated socket that records the size of every datagram it sends and
/// receives, so that a replay compares the wire, not just what the
/// application saw.
#[derive(Debug)]
struct RecordingSocket {
    inner: Arc<SimUdpSocket>,
    host: &'static str,
    trace: Trace,
}

impl AsyncUdpSocket for RecordingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.trace.record(
            self.host,
            format!("udp out {} bytes", transmit.contents.len()),
        );
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n_received = ready!(self.inner.poll_recv(cx, bufs, meta))?;
        for received in &meta[..n_received] {
            self.trace
                .record(self.host, format!("udp in {} bytes", received.len));
        }
        Poll::Ready(Ok(n_received))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The QUIC server software: accepts connections one after another,
/// answers every datagram with `echo:` and the datagram, and every
/// bidirectional stream, once its sender finished it, with `echo:` and all
/// it carried.
async fn echo_server(
    sim_seed: u64,
    socket: Arc<dyn AsyncUdpSocket>,
    config: quinn::ServerConfig,
    trace: Trace,
) -> anyhow::Result<()> {
    let endpoint = endpoint(endpoint_seed(sim_seed, SERVER), Some(config), socket)?;
    while let Some(incoming) = endpoint.accept().await {
        let connection = incoming.await?;
        trace.record(SERVER, "connected");
        tokio::spawn(echo_streams(connection.clone()));
        loop {
            match connection.read_datagram().await {
                Ok(datagram) => {
                    trace.record(
                        SERVER,
                        format!("got {:?}", String::from_utf8_lossy(&datagram)),
                    );
                    let reply = [b"echo:".as_slice(), &datagram].concat();
                    connection.send_datagram(Bytes::from(reply))?;
                }
                Err(error) => {
                    trace.record(SERVER, format!("connection ended: {error}"));
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Echoes every bidirectional stream the peer opens, until the connection
/// ends.
async fn echo_streams(connection: quinn::Connection) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            let echoed = async {
                let data = recv.read_to_end(MAX_ECHO).await?;
                send.write_all(b"echo:").await?;
                send.write_all(&data).await?;
                send.finish()?;
                anyhow::Ok(())
            };
            if let Err(error) = echoed.await {
                tracing::debug!(%error, "stream echo failed");
            }
        });
    }
}

/// The client's side of the datagram echo: numbered pings, and which of
/// them were answered.
struct Pinger {
    connection: quinn::Connection,
    trace: Trace,
    next_ping: u32,
    answered: Vec<u32>,
}

impl Pinger {
    /// Sends the next ping and collects every reply that arrives within
    /// `REPLY_WAIT`; returns the numbers of the pings they answer, which
    /// may include earlier pings.
    async fn ping(&mut self) -> anyhow::Result<Vec<u32>> {
        let n = self.next_ping;
        self.next_ping += 1;
        let ping = format!("ping {n}");
        self.connection
            .send_datagram(Bytes::copy_from_slice(ping.as_bytes()))?;
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        let mut answered = Vec::new();
        while let Ok(reply) = timeout_at(deadline, self.connection.read_datagram()).await {
            let reply = String::from_utf8(reply?.to_vec())?;
            self.trace.record(CLIENT, format!("reply {reply:?}"));
            let answers = reply
                .strip_prefix("echo:ping ")
                .and_then(|k| k.parse().ok())
                .with_context(|| format!("unexpected reply {reply:?}"))?;
            answered.push(answers);
        }
        self.answered.extend_from_slice(&answered);
        Ok(answered)
    }
}

/// The client side of the datagram scenario: replies both ways, silence
/// across a partition, replies again after the repair.
///
/// Datagrams are unreliable even on a healthy link: a ping sent right after
/// the handshake is dropped by the server if it overtakes the client's
/// Finished message (turmoil reorders messages when latencies differ). So
/// the healthy phase expects most pings answered, not all.
async fn datagram_client(
    sim_seed: u64,
    socket: Arc<dyn AsyncUdpSocket>,
    config: quinn::ClientConfig,
    trace: Trace,
) -> anyhow::Result<()> {
    const HEALTHY_PINGS: u32 = 10;
    const PARTITIONED_PINGS: u32 = 8;
    const MAX_PINGS_AFTER_REPAIR: u32 = 10;

    let endpoint = endpoint(endpoint_seed(sim_seed, CLIENT), None, socket)?;
    let connection = endpoint
        .connect_with(config, server_quic_addr(), SERVER)?
        .await
        .context("QUIC handshake")?;
    trace.record(CLIENT, "connected");
    let mut pinger = Pinger {
        connection: connection.clone(),
        trace: trace.clone(),
        next_ping: 0,
        answered: Vec::new(),
    };

    for _ in 0..HEALTHY_PINGS {
        pinger.ping().await?;
    }
    ensure!(
        pinger.answered.len() >= 3,
        "only pings {:?} of {HEALTHY_PINGS} were answered on a healthy link",
        pinger.answered
    );

    turmoil::partition(CLIENT, SERVER);
    trace.record(CLIENT, "partitioned");
    let first_partitioned = pinger.next_ping;
    for _ in 0..PARTITIONED_PINGS {
        // Replies already delivered to the client's host before the
        // partition may still be read; nothing sent after it may arrive.
        let answered = pinger.ping().await?;
        ensure!(
            answered.iter().all(|&n| n < first_partitioned),
            "pings {answered:?} were answered across the partition"
        );
    }

    turmoil::repair(CLIENT, SERVER);
    trace.record(CLIENT, "repaired");
    let first_repaired = pinger.next_ping;
    let mut answered_after_repair = false;
    for _ in 0..MAX_PINGS_AFTER_REPAIR {
        if pinger.ping().await?.iter().any(|&n| n >= first_repaired) {
            answered_after_repair = true;
            break;
        }
    }
    ensure!(answered_after_repair, "no reply after the repair");
    // Datagrams sent across the partition were dropped, not held.
    ensure!(
        pinger
            .answered
            .iter()
            .all(|n| !(first_partitioned..first_repaired).contains(n)),
        "a ping from the partition was answered late: {:?}",
        pinger.answered
    );

    trace.record(CLIENT, format!("rtt {:?}", connection.rtt()));
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    trace.record(CLIENT, "closed");
    Ok(())
}

/// Runs the datagram scenario with a recording socket on each side and
/// returns everything both hosts did, in simulated time.
fn quic_exchange(test: &str, seed: u64) -> anyhow::Result<Vec<(Duration, String)>> {
    let transport = transport(Duration::from_secs(10), Some(Duration::from_secs(1)))?;
    let (server_config, client_config) = quic_configs(transport)?;
    let trace = Trace::default();
    let mut sim = builder(seed).build();

    let server_trace = trace.clone();
    sim.host(SERVER, move || {
        let config = server_config.clone();
        let trace = server_trace.clone();
        async move {
            let socket = RecordingSocket {
                inner: bind_udp(any_port(QUIC_PORT)).await?,
                host: SERVER,
                trace: trace.clone(),
            };
            echo_server(seed, Arc::new(socket), config, trace)
                .await
                .map_err(Into::into)
        }
    });

    let client_trace = trace.clone();
    sim.client(CLIENT, async move {
        let socket = RecordingSocket {
            inner: bind_udp(any_port(0)).await?,
            host: CLIENT,
            trace: client_trace.clone(),
        };
        datagram_client(seed, Arc::new(socket), client_config, client_trace)
            .await
            .map_err(Into::into)
    });

    run(test, seed, &mut sim)?;
    Ok(trace.take())
}

/// A simulation whose `SERVER` host runs `echo_server` with `transport`;
/// returns it with the client's config.
fn echo_sim(
    seed: u64,
    transport: TransportConfig,
) -> anyhow::Result<(turmoil::Sim<'static>, quinn::ClientConfig)> {
    let (server_config, client_config) = quic_configs(transport)?;
    let mut sim = builder(seed).build();
    sim.host(SERVER, move || {
        let config = server_config.clone();
        async move {
            let socket = bind_udp(any_port(QUIC_PORT)).await?;
            echo_server(seed, socket, config, Trace::default())
                .await
                .map_err(Into::into)
        }
    });
    Ok((sim, client_config))
}

#[test]
fn quic_datagrams_flow_both_ways_stop_in_a_partition_and_resume_after_repair() -> anyhow::Result<()>
{
    const SEED: u64 = 7;
    let trace = quic_exchange(
        "quic_datagrams_flow_both_ways_stop_in_a_partition_and_resume_after_repair",
        SEED,
    )?;
    let heard: Vec<u32> = trace
        .iter()
        .filter_map(|(_, event)| event.strip_prefix("server: got \"ping "))
        .filter_map(|n| n.trim_end_matches('"').parse().ok())
        .collect();
    // Ten pings before the partition, eight during it, then the repair.
    assert!(heard.iter().any(|&n| n < 10), "{trace:#?}");
    assert!(!heard.iter().any(|n| (10..18).contains(n)), "{trace:#?}");
    assert!(heard.iter().any(|&n| n >= 18), "{trace:#?}");
    Ok(())
}

#[test]
fn quic_streams_carry_data_both_ways_and_deliver_what_a_partition_held_up() -> anyhow::Result<()> {
    const TEST: &str = "quic_streams_carry_data_both_ways_and_deliver_what_a_partition_held_up";
    const SEED: u64 = 13;
    const PARTITION: Duration = Duration::from_secs(2);
    const RECOVERY: Duration = Duration::from_secs(8);

    // The idle timeout outlasts the partition and the recovery: the
    // connection must survive, and quinn retransmit what was lost.
    let transport = transport(Duration::from_secs(30), Some(Duration::from_secs(1)))?;
    let (mut sim, client_config) = echo_sim(SEED, transport)?;
    sim.client(CLIENT, async move {
        let socket = bind_udp(any_port(0)).await?;
        let endpoint = endpoint(endpoint_seed(SEED, CLIENT), None, socket)?;
        let connection = endpoint
            .connect_with(client_config, server_quic_addr(), SERVER)?
            .await?;

        // Larger than many datagrams, so that it is split, acknowledged and
        // reassembled in order.
        let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&large).await?;
        send.finish()?;
        let echoed = recv.read_to_end(MAX_ECHO).await?;
        if echoed != [b"echo:".as_slice(), &large].concat() {
            return Err(format!(
                "echoed {} bytes, not the {} sent",
                echoed.len(),
                large.len()
            )
            .into());
        }

        turmoil::partition(CLIENT, SERVER);
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(b"sent into the partition").await?;
        send.finish()?;
        let reply = tokio::spawn(async move { recv.read_to_end(MAX_ECHO).await });
        tokio::time::sleep(PARTITION).await;
        if reply.is_finished() {
            return Err(format!("a reply crossed the partition: {:?}", reply.await).into());
        }

        // Unlike turmoil's TCP, QUIC retransmits: what the partition
        // dropped arrives after the repair, on the same connection.
        turmoil::repair(CLIENT, SERVER);
        let Ok(reply) = timeout(RECOVERY, reply).await else {
            return Err(format!("no reply within {RECOVERY:?} of the repair").into());
        };
        let reply = reply??;
        if reply != b"echo:sent into the partition" {
            return Err(format!("unexpected reply {:?}", String::from_utf8_lossy(&reply)).into());
        }
        if let Some(reason) = connection.close_reason() {
            return Err(format!("the connection closed: {reason}").into());
        }
        Ok(())
    });
    run(TEST, SEED, &mut sim)
}

#[test]
fn quic_exchange_replays_exactly_from_its_seed() -> anyhow::Result<()> {
    const TEST: &str = "quic_exchange_replays_exactly_from_its_seed";
    const SEED: u64 = 42;
    let first = quic_exchange(TEST, SEED)?;
    let second = quic_exchange(TEST, SEED)?;
    if let Some(idx) = (0..first.len().max(second.len())).find(|&i| first.get(i) != second.get(i)) {
        panic!(
            "seed {SEED} did not replay: {} vs {} records, first difference at #{idx}: \
             {:?} vs {:?}\nreproduce: cargo test -p tollgate-sim --test net {TEST}",
            first.len(),
            second.len(),
            first.get(idx),
            second.get(idx),
        );
    }
    assert!(
        first
            .iter()
            .any(|(_, event)| event.starts_with("client: udp out")),
        "the trace records the wire"
    );
    // The seed matters: turmoil draws link latencies from it, and quinn
    // its packet number skips.
    let other = quic_exchange(TEST, SEED + 1)?;
    assert_ne!(
        first,
        other,
        "seeds {SEED} and {} gave the same run",
        SEED + 1
    );
    Ok(())
}

#[test]
fn quic_runtime_clock_and_timers_follow_simulated_time() -> anyhow::Result<()> {
    const TEST: &str = "quic_runtime_clock_and_timers_follow_simulated_time";
    const SEED: u64 = 17;
    // Turmoil advances time a tick (1 ms) at a time; a timer fires on the
    // first tick at or after its deadline.
    const SLACK: Duration = Duration::from_millis(2);

    let mut sim = builder(SEED).build();
    let scenario = async {
        let runtime = SimQuinnRuntime;
        let start = runtime.now();
        let sim_start = turmoil::sim_elapsed().context("inside the simulation")?;

        // quinn's clock moves with simulated time, not with the wall clock.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let slept = runtime.now() - start;
        ensure!(
            slept >= Duration::from_secs(5) && slept <= Duration::from_secs(5) + SLACK,
            "quinn's clock moved {slept:?} over 5 s of simulated time"
        );

        // A timer fires at its deadline on quinn's clock.
        let deadline = runtime.now() + Duration::from_secs(3);
        let mut timer = runtime.new_timer(deadline);
        poll_fn(|cx| timer.as_mut().poll(cx)).await;
        let fired = runtime.now();
        ensure!(
            fired >= deadline && fired <= deadline + SLACK,
            "a timer for {deadline:?} fired at {fired:?}"
        );

        // A reset timer fires at its new deadline.
        let deadline = fired + Duration::from_millis(750);
        timer.as_mut().reset(deadline);
        poll_fn(|cx| timer.as_mut().poll(cx)).await;
        let fired = runtime.now();
        ensure!(
            fired >= deadline && fired <= deadline + SLACK,
            "a timer reset to {deadline:?} fired at {fired:?}"
        );

        // And the simulation saw the same time pass.
        let sim_spent = turmoil::sim_elapsed().context("inside the simulation")? - sim_start;
        let quinn_spent = runtime.now() - start;
        ensure!(
            sim_spent.abs_diff(quinn_spent) <= SLACK,
            "the simulation spent {sim_spent:?}, quinn's clock {quinn_spent:?}"
        );
        anyhow::Ok(())
    };
    sim.client(CLIENT, async { scenario.await.map_err(Into::into) });
    run(TEST, SEED, &mut sim)
}

#[test]
fn quic_idle_timeout_and_keep_alive_follow_simulated_time() -> anyhow::Result<()> {
    const TEST: &str = "quic_idle_timeout_and_keep_alive_follow_simulated_time";
    const SEED: u64 = 11;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
    const KEEP_ALIVE: Duration = Duration::from_millis(500);
    const HEALTHY: Duration = Duration::from_secs(5);
    const PARTITION: Duration = Duration::from_secs(10);
    const LATENCY: Duration = Duration::from_millis(5);

    let transport = transport(IDLE_TIMEOUT, Some(KEEP_ALIVE))?;
    let (server_config, client_config) = quic_configs(transport)?;
    // A fixed, short latency keeps quinn's probe timeout small: the
    // effective idle timeout is the larger of the configured one and three
    // probe timeouts.
    let mut sim = builder(SEED)
        .min_message_latency(LATENCY)
        .max_message_latency(LATENCY)
        .build();
    sim.host(SERVER, move || {
        let config = server_config.clone();
        async move {
            let socket = bind_udp(any_port(QUIC_PORT)).await?;
            echo_server(SEED, socket, config, Trace::default())
                .await
                .map_err(Into::into)
        }
    });

    let closed_after = Arc::new(Mutex::new(None));
    let client_closed_after = Arc::clone(&closed_after);
    sim.client(CLIENT, async move {
        let socket = bind_udp(any_port(0)).await?;
        let endpoint = endpoint(endpoint_seed(SEED, CLIENT), None, socket)?;
        let connection = endpoint
            .connect_with(client_config, server_quic_addr(), SERVER)?
            .await?;

        // Quiet but healthy for more than two idle timeouts: keep-alives,
        // sent on simulated time, keep the connection open.
        tokio::time::sleep(HEALTHY).await;
        if let Some(reason) = connection.close_reason() {
            return Err(format!("closed while healthy: {reason}").into());
        }

        let partitioned_at = tokio::time::Instant::now();
        turmoil::partition(CLIENT, SERVER);
        // Waits at most the partition's length; the close comes long before.
        let Ok(reason) = timeout(PARTITION, connection.closed()).await else {
            return Err(format!("still open after {PARTITION:?} of partition").into());
        };
        let after = partitioned_at.elapsed();
        if !matches!(reason, ConnectionError::TimedOut) {
            return Err(format!("closed for another reason: {reason}").into());
        }
        *client_closed_after.lock().expect("lock") = Some(after);
        Ok(())
    });

    let wall_clock = std::time::Instant::now();
    run(TEST, SEED, &mut sim)?;
    let wall_clock = wall_clock.elapsed();

    let after = closed_after
        .lock()
        .expect("lock")
        .context("the client recorded no close")?;
    // The idle timer restarts when a packet is received, and when the first
    // ack-eliciting packet after a receipt is sent (RFC 9000, 10.1): the
    // last receipt came at most one keep-alive interval before the
    // partition, and the first keep-alive sent into the partition at most
    // one interval after that receipt.
    assert!(
        after >= IDLE_TIMEOUT - KEEP_ALIVE && after <= IDLE_TIMEOUT + KEEP_ALIVE,
        "closed {after:?} after the partition, idle timeout {IDLE_TIMEOUT:?}"
    );
    // The run covers about 7 s of simulated time. Were quinn's timers on
    // the wall clock, they would spin until as much real time had passed
    // (and the close would still land in the window above); on the
    // simulated clock the run takes a fraction of a second.
    let simulated = HEALTHY + IDLE_TIMEOUT;
    assert!(
        wall_clock < simulated / 2,
        "{simulated:?} of simulated time took {wall_clock:?} of wall clock"
    );
    Ok(())
}

#[test]
fn quic_datagrams_to_an_address_outside_the_simulation_are_lost_not_fatal() -> anyhow::Result<()> {
    const TEST: &str = "quic_datagrams_to_an_address_outside_the_simulation_are_lost_not_fatal";
    const SEED: u64 = 19;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
    // The handshake gives up after the idle timeout or three probe
    // timeouts, whichever is longer: a few seconds with quinn's initial RTT.
    const GIVE_UP: Duration = Duration::from_secs(10);

    let transport = transport(IDLE_TIMEOUT, None)?;
    let (mut sim, client_config) = echo_sim(SEED, transport)?;
    let scenario = async move {
        let socket = bind_udp(any_port(0)).await?;
        let endpoint = endpoint(endpoint_seed(SEED, CLIENT), None, socket)?;

        // Turmoil refuses every send to an address no host has. The
        // handshake's datagrams are lost; the connection times out like
        // one to an unreachable peer instead of hanging.
        let nowhere = SocketAddr::new(IpAddr::from([10, 255, 0, 1]), QUIC_PORT);
        let connecting = endpoint.connect_with(client_config.clone(), nowhere, SERVER)?;
        match timeout(GIVE_UP, connecting).await {
            Ok(Err(ConnectionError::TimedOut)) => {}
            Ok(other) => bail!("connecting to nowhere ended with {other:?}"),
            Err(_) => bail!("connecting to nowhere neither failed nor timed out in {GIVE_UP:?}"),
        }

        // The endpoint is unharmed: it connects to the server and its
        // datagrams flow.
        let connection = timeout(
            GIVE_UP,
            endpoint.connect_with(client_config, server_quic_addr(), SERVER)?,
        )
        .await
        .context("connecting to the server")??;
        let mut pinger = Pinger {
            connection,
            trace: Trace::default(),
            next_ping: 0,
            answered: Vec::new(),
        };
        for _ in 0..10 {
            if !pinger.ping().await?.is_empty() {
                return Ok(());
            }
        }
        bail!("no datagram was answered after the failed connection")
    };
    sim.client(CLIENT, async { scenario.await.map_err(Into::into) });
    run(TEST, SEED, &mut sim)
}

/// A Raft service that answers every call with the request's payload, and
/// `node_status` with the caller's address as the server saw it; it refuses
/// a call whose peer address the transport did not report.
struct EchoRaft;

fn echo(request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
    if request.remote_addr().is_none() {
        return Err(Status::internal("the transport reported no peer address"));
    }
    Ok(Response::new(request.into_inner()))
}

#[tonic::async_trait]
impl Raft for EchoRaft {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn client_write(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn join(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn remove_node(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        echo(request)
    }

    async fn node_status(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let peer = request
            .remote_addr()
            .ok_or_else(|| Status::internal("the transport reported no peer address"))?;
        Ok(Response::new(RaftMessage {
            payload: peer.ip().to_string().into_bytes(),
        }))
    }
}

fn grpc_sim(seed: u64) -> turmoil::Sim<'static> {
    let mut sim = builder(seed).build();
    sim.host(SERVER, || async {
        let listener = turmoil::net::TcpListener::bind(any_port(GRPC_PORT)).await?;
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(EchoRaft))
            .serve_with_incoming(incoming(listener))
            .await?;
        Ok(())
    });
    sim
}

fn grpc_addr() -> String {
    format!("{SERVER}:{GRPC_PORT}")
}

async fn append(
    client: &mut RaftClient<tonic::transport::Channel>,
    payload: &[u8],
) -> Result<Vec<u8>, Status> {
    let request = RaftMessage {
        payload: payload.to_vec(),
    };
    Ok(client.append_entries(request).await?.into_inner().payload)
}

#[test]
fn grpc_calls_reach_a_server_on_another_host() -> anyhow::Result<()> {
    const SEED: u64 = 3;
    let mut sim = grpc_sim(SEED);
    sim.client(CLIENT, async {
        let mut client = RaftClient::new(channel(&grpc_addr())?);
        assert_eq!(append(&mut client, b"entries").await?, b"entries");
        let vote = client
            .vote(RaftMessage {
                payload: b"vote".to_vec(),
            })
            .await?;
        assert_eq!(vote.into_inner().payload, b"vote");
        // The server sees the call coming from the client's host, as
        // `Request::remote_addr` reports it over real TCP.
        let seen = client
            .node_status(RaftMessage::default())
            .await?
            .into_inner()
            .payload;
        assert_eq!(
            String::from_utf8(seen)?,
            turmoil::lookup(CLIENT).to_string()
        );
        Ok(())
    });
    run("grpc_calls_reach_a_server_on_another_host", SEED, &mut sim)
}

#[test]
fn grpc_call_in_a_partition_fails_instead_of_hanging() -> anyhow::Result<()> {
    const SEED: u64 = 5;
    const CALL_TIMEOUT: Duration = Duration::from_secs(2);
    // Longer than any connect timeout of `channel`.
    const CONNECT_BOUND: Duration = Duration::from_secs(2);
    let mut sim = grpc_sim(SEED);
    sim.client(CLIENT, async {
        let mut client = RaftClient::new(channel(&grpc_addr())?);
        assert_eq!(append(&mut client, b"before").await?, b"before");

        turmoil::partition(CLIENT, SERVER);
        // The request's bytes are dropped and no answer comes: the call
        // fails through the caller's timeout, as the node bounds its calls.
        let on_open_connection = timeout(CALL_TIMEOUT, append(&mut client, b"during")).await;
        if on_open_connection.is_ok() {
            return Err(format!("expected a timeout, got {on_open_connection:?}").into());
        }
        // A new connection is refused (turmoil drops the SYN and reports
        // it), or at worst gives up after the connect timeout.
        let mut fresh = RaftClient::new(channel(&grpc_addr())?);
        match timeout(CONNECT_BOUND, append(&mut fresh, b"during")).await {
            Ok(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
            other => return Err(format!("expected Unavailable, got {other:?}").into()),
        }

        turmoil::repair(CLIENT, SERVER);
        let mut fresh = RaftClient::new(channel(&grpc_addr())?);
        assert_eq!(append(&mut fresh, b"after").await?, b"after");
        // turmoil's TCP does not retransmit: the old connection lost bytes
        // to the partition and stays stalled after the repair.
        let stalled = timeout(CALL_TIMEOUT, append(&mut client, b"after")).await;
        if stalled.is_ok() {
            return Err(format!("the stalled connection answered: {stalled:?}").into());
        }
        Ok(())
    });
    run(
        "grpc_call_in_a_partition_fails_instead_of_hanging",
        SEED,
        &mut sim,
    )
}

#[test]
fn std_sockets_cannot_join_the_simulated_network() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback socket");
    let error = SimQuinnRuntime
        .wrap_udp_socket(socket)
        .expect_err("a std socket is refused");
    assert_eq!(error.kind(), io::ErrorKind::Unsupported);
}
