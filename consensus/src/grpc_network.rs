//! The Raft transport over gRPC: [`GrpcNetwork`] (openraft's network
//! factory) and [`PeerClient`], the shared client that also carries
//! forwarded writes, join/remove requests and status queries.
//!
//! This module owns connections to peers (one lazily connected tonic
//! `Channel` per address, cached, whose streams a [`Dial`] opens), the
//! cluster token sent with every call,
//! timeouts, retry backoff, and the mapping of transport failures onto
//! openraft's `RPCError`s. It must not decide anything about Raft state:
//! requests and answers are encoded by [`crate::wire`] and handled by
//! openraft or [`crate::node`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Infallible, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tollgate_proto::v1::RaftMessage;
use tollgate_proto::v1::raft_client::RaftClient;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::dial::{Dial, DialConnector, TcpDialer};
use crate::types::{NodeId, NodeInfo, TypeConfig};
use crate::wire::{self, SnapshotChunk, WireError};

/// Largest Raft message (request or response) either side accepts. A
/// snapshot chunk is at most [`SNAPSHOT_CHUNK_BYTES`] of data, and
/// AppendEntries batches at most `max_payload_entries` commands, each a
/// license document well under 1 MiB; this leaves ample headroom.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of the snapshot chunks the leader sends (openraft's
/// `snapshot_max_chunk_size`), far below [`MAX_RAFT_MESSAGE_BYTES`] even
/// with encoding overhead.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// Most peer addresses whose channels are kept. Membership is a handful of
/// nodes; past this bound (addresses churned by many re-joins) the cache
/// starts over rather than growing.
const MAX_CACHED_CHANNELS: usize = 256;

/// How often an HTTP/2 ping checks a peer connection.
const KEEPALIVE_INTERVAL_MS: u64 = 1_000;
/// How long a ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT_MS: u64 = 1_000;

/// The metadata key carrying the cluster token.
pub(crate) const AUTHORIZATION: &str = "authorization";

/// Timeouts and retry pacing of the Raft transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// Bound on establishing a connection to a peer (one [`Dial::dial`]).
    pub connect_timeout_ms: u64,
    /// Timeout of one InstallSnapshot RPC (one chunk, and for the last one
    /// also installing the snapshot). Used when larger than the per-RPC
    /// timeout openraft passes.
    pub install_snapshot_timeout_ms: u64,
    /// First delay before retrying an unreachable peer.
    pub backoff_initial_ms: u64,
    /// The retry delay doubles up to this bound.
    pub backoff_max_ms: u64,
    /// Timeout of a `NodeStatus` query, kept short so a status fan-out over
    /// a partly dead cluster answers quickly.
    pub status_timeout_ms: u64,
}

impl Default for TransportSettings {
    /// Settings for peers a WAN apart: connecting may take a few round
    /// trips, and an unreachable peer is retried quickly at first, then at
    /// most once a second.
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            install_snapshot_timeout_ms: 30_000,
            backoff_initial_ms: 50,
            backoff_max_ms: 1_000,
            status_timeout_ms: 1_000,
        }
    }
}

impl TransportSettings {
    /// The exponential backoff for an unreachable peer: initial, doubling,
    /// capped at the maximum, forever (openraft drops it after a success).
    pub fn backoff(&self) -> Backoff {
        let max = Duration::from_millis(self.backoff_max_ms.max(1));
        let mut next = Duration::from_millis(self.backoff_initial_ms.max(1)).min(max);
        Backoff::new(std::iter::repeat_with(move || {
            let current = next;
            next = next.saturating_mul(2).min(max);
            current
        }))
    }
}

/// The transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The cluster token cannot be sent as gRPC metadata.
    #[error("the cluster token must be non-empty printable ASCII")]
    InvalidToken,
}

/// The Raft RPCs of the `tollgate.v1.Raft` service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    ClientWrite,
    Join,
    RemoveNode,
    NodeStatus,
}

/// One call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The address cannot be turned into an endpoint URI.
    #[error("invalid peer address {addr:?}: {detail}")]
    InvalidAddress {
        /// The address.
        addr: String,
        /// Why it is invalid.
        detail: String,
    },
    /// The peer could not be reached or refuses this node (connection
    /// failure, `UNAVAILABLE`, wrong cluster token, unknown service).
    #[error("{addr} unreachable ({code:?}): {message}")]
    Unreachable {
        /// The address.
        addr: String,
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// No answer within the timeout; the request may or may not have been
    /// processed.
    #[error("{addr} did not answer within {after_ms} ms")]
    Timeout {
        /// The address.
        addr: String,
        /// The timeout.
        after_ms: u64,
    },
    /// The peer answered with another error status (e.g. it could not
    /// decode our request).
    #[error("{addr} failed the call ({code:?}): {message}")]
    Failed {
        /// The address.
        addr: String,
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// A request could not be encoded or an answer decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// This node runs without the gRPC transport (started with another
    /// network), so it cannot call peers.
    #[error("this node has no gRPC transport to reach peers")]
    NoTransport,
}

impl CallError {
    /// Whether the request certainly was not processed by the peer.
    pub fn not_delivered(&self) -> bool {
        matches!(
            self,
            Self::InvalidAddress { .. } | Self::Unreachable { .. } | Self::NoTransport
        )
    }
}

struct PeerClientInner {
    settings: TransportSettings,
    authorization: AsciiMetadataValue,
    dialer: Arc<dyn Dial>,
    channels: Mutex<HashMap<String, Channel>>,
}

/// The client side of the Raft transport, shared by every connection and
/// by [`crate::ConsensusNode`]: channels are cached per address and every
/// call carries `authorization: Bearer <cluster token>`.
#[derive(Clone)]
pub struct PeerClient {
    inner: Arc<PeerClientInner>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("PeerClient")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A client that authenticates with `cluster_token` and reaches peers
    /// over TCP ([`TcpDialer`]).
    pub fn new(settings: &TransportSettings, cluster_token: &str) -> Result<Self, TransportError> {
        Self::with_dialer(settings, cluster_token, Arc::new(TcpDialer))
    }

    /// A client that authenticates with `cluster_token` and opens its
    /// connections with `dialer` (each attempt bounded by
    /// `settings.connect_timeout_ms`).
    pub fn with_dialer(
        settings: &TransportSettings,
        cluster_token: &str,
        dialer: Arc<dyn Dial>,
    ) -> Result<Self, TransportError> {
        if cluster_token.is_empty() {
            return Err(TransportError::InvalidToken);
        }
        let authorization: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {cluster_token}"))
                .map_err(|_| TransportError::InvalidToken)?;
        Ok(Self {
            inner: Arc::new(PeerClientInner {
                settings: settings.clone(),
                authorization,
                dialer,
                channels: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The transport settings.
    pub fn settings(&self) -> &TransportSettings {
        &self.inner.settings
    }

    fn channel(&self, addr: &str) -> Result<Channel, CallError> {
        let mut channels = self.inner.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            CallError::InvalidAddress {
                addr: addr.to_string(),
                detail: e.to_string(),
            }
        })?;
        // The connector bounds each attempt by the connect timeout itself,
        // so the endpoint sets none.
        let connector = DialConnector::new(
            self.inner.dialer.clone(),
            addr,
            Duration::from_millis(self.inner.settings.connect_timeout_ms),
        );
        // A peer cut off without a reset (a partition, a dead host) leaves
        // the HTTP/2 connection open but silent, and every call on it times
        // out while the channel never reconnects. Pings find such a
        // connection and drop it, so the next call dials afresh (found by
        // the simulator: a follower cut off once never caught up again).
        let channel = endpoint
            .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(connector);
        if channels.len() >= MAX_CACHED_CHANNELS {
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Sends `payload` as `rpc` to the peer at `addr` (`host:port`) and
    /// returns the answer's payload, giving up after `timeout`.
    pub(crate) async fn call(
        &self,
        addr: &str,
        rpc: RaftRpc,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let channel = self.channel(addr)?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let mut request = tonic::Request::new(RaftMessage { payload });
        // Sent as `grpc-timeout`, so the peer stops working on an answer we
        // will no longer wait for.
        request.set_timeout(timeout);
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.inner.authorization.clone());
        let call = async move {
            match rpc {
                RaftRpc::AppendEntries => client.append_entries(request).await,
                RaftRpc::Vote => client.vote(request).await,
                RaftRpc::InstallSnapshot => client.install_snapshot(request).await,
                RaftRpc::ClientWrite => client.client_write(request).await,
                RaftRpc::Join => client.join(request).await,
                RaftRpc::RemoveNode => client.remove_node(request).await,
                RaftRpc::NodeStatus => client.node_status(request).await,
            }
        };
        let after_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(CallError::Timeout {
                addr: addr.to_string(),
                after_ms,
            }),
            Ok(Ok(response)) => Ok(response.into_inner().payload),
            Ok(Err(status)) => Err(classify(addr, &status, after_ms)),
        }
    }

    /// Encodes `request`, calls `rpc` at `addr` and decodes the answer.
    pub(crate) async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        rpc: RaftRpc,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let payload = wire::encode(request_name(rpc), request)?;
        let answer = self.call(addr, rpc, payload, timeout).await?;
        Ok(wire::decode(response_name(rpc), &answer)?)
    }
}

/// Sorts a failed call's status into what the caller can act on.
fn classify(addr: &str, status: &tonic::Status, after_ms: u64) -> CallError {
    let addr = addr.to_string();
    let message = status.message().to_string();
    match status.code() {
        // A peer that refuses us (wrong token, not serving the Raft service)
        // is as useless to Raft as a dead one, and must be retried with the
        // same backoff instead of on every heartbeat.
        code @ (Code::Unavailable
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::Unimplemented) => CallError::Unreachable {
            addr,
            code,
            message,
        },
        Code::DeadlineExceeded | Code::Cancelled => CallError::Timeout { addr, after_ms },
        code => CallError::Failed {
            addr,
            code,
            message,
        },
    }
}

fn request_name(rpc: RaftRpc) -> &'static str {
    match rpc {
        RaftRpc::AppendEntries => "append entries request",
        RaftRpc::Vote => "vote request",
        RaftRpc::InstallSnapshot => "install snapshot request",
        RaftRpc::ClientWrite => "client write request",
        RaftRpc::Join => "join request",
        RaftRpc::RemoveNode => "remove node request",
        RaftRpc::NodeStatus => "node status request",
    }
}

fn response_name(rpc: RaftRpc) -> &'static str {
    match rpc {
        RaftRpc::AppendEntries => "append entries response",
        RaftRpc::Vote => "vote response",
        RaftRpc::InstallSnapshot => "install snapshot response",
        RaftRpc::ClientWrite => "client write response",
        RaftRpc::Join => "join response",
        RaftRpc::RemoveNode => "remove node response",
        RaftRpc::NodeStatus => "node status response",
    }
}

/// openraft's network factory over gRPC: one [`GrpcConnection`] per target,
/// all sharing one [`PeerClient`].
#[derive(Clone, Debug)]
pub struct GrpcNetwork {
    node_id: NodeId,
    peers: PeerClient,
}

impl GrpcNetwork {
    /// The network of node `node_id`, authenticating with `cluster_token`.
    pub fn new(
        node_id: NodeId,
        settings: &TransportSettings,
        cluster_token: &str,
    ) -> Result<Self, TransportError> {
        Ok(Self::with_client(
            node_id,
            PeerClient::new(settings, cluster_token)?,
        ))
    }

    /// The network of node `node_id` over an existing client.
    pub fn with_client(node_id: NodeId, peers: PeerClient) -> Self {
        Self { node_id, peers }
    }

    /// The shared client.
    pub fn client(&self) -> &PeerClient {
        &self.peers
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        GrpcConnection {
            node_id: self.node_id,
            target,
            target_node: node.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// A connection from this node to one peer. Cheap: the channel underneath
/// is shared and connects lazily.
#[derive(Clone, Debug)]
pub struct GrpcConnection {
    node_id: NodeId,
    target: NodeId,
    target_node: NodeInfo,
    peers: PeerClient,
}

impl GrpcConnection {
    /// Sends one Raft RPC whose answer is `Result<Resp, RaftError<E>>` and
    /// maps every failure onto openraft's error kinds.
    async fn send<Req, Resp, E>(
        &self,
        rpc: RaftRpc,
        action: RPCTypes,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .peers
            .request(&self.target_node.raft_addr, rpc, request, timeout)
            .await
            .map_err(|e| match e {
                CallError::InvalidAddress { .. }
                | CallError::Unreachable { .. }
                | CallError::NoTransport => RPCError::Unreachable(Unreachable::new(&e)),
                CallError::Timeout { .. } => RPCError::Timeout(Timeout {
                    action,
                    id: self.node_id,
                    target: self.target,
                    timeout,
                }),
                CallError::Failed { .. } | CallError::Wire(_) => {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        answer.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.target_node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send::<_, _, Infallible>(
            RaftRpc::AppendEntries,
            RPCTypes::AppendEntries,
            &rpc,
            option.hard_ttl(),
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // Installing the last chunk builds the config from the snapshot,
        // which takes longer than a heartbeat-sized TTL.
        let explicit = Duration::from_millis(self.peers.settings().install_snapshot_timeout_ms);
        let timeout = option.hard_ttl().max(explicit);
        let chunk = SnapshotChunk::from(rpc);
        self.send(
            RaftRpc::InstallSnapshot,
            RPCTypes::InstallSnapshot,
            &chunk,
            timeout,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send::<_, _, Infallible>(RaftRpc::Vote, RPCTypes::Vote, &rpc, option.hard_ttl())
            .await
    }

    fn backoff(&self) -> Backoff {
        self.peers.settings().backoff()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let settings = TransportSettings::default();
        let delays: Vec<u64> = settings
            .backoff()
            .take(7)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .collect();
        assert_eq!(delays, vec![50, 100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn a_token_that_cannot_be_metadata_is_refused() {
        let settings = TransportSettings::default();
        assert!(PeerClient::new(&settings, "").is_err());
        assert!(PeerClient::new(&settings, "line\nbreak").is_err());
        assert!(PeerClient::new(&settings, "s3cret-token").is_ok());
    }
}
