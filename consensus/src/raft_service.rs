//! The server side of the Raft transport: [`RaftService`] implements the
//! generated `tollgate.v1.Raft` service over a [`ConsensusNode`], and
//! [`raft_server`] wraps it with the message size limits.
//!
//! This module owns authenticating peers (the cluster token, compared as
//! SHA-256 hashes), decoding requests and encoding answers, and handing
//! each RPC to openraft or to the node's write and membership functions. It
//! must not bind sockets or spawn the server: the caller serves
//! [`raft_server`] on a listener it owns, as the edge and admin APIs are.
//! A bad payload is answered with `INVALID_ARGUMENT`, never a panic.

use std::sync::Arc;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tollgate_proto::v1::RaftMessage;
use tollgate_proto::v1::raft_server::{Raft, RaftServer};
use tollgate_quota::config::ConfigCommand;
use tonic::{Request, Response, Status};

use crate::grpc_network::{AUTHORIZATION, MAX_RAFT_MESSAGE_BYTES};
use crate::node::ConsensusNode;
use crate::types::{NodeId, TypeConfig};
use crate::wire::{
    self, ClientWriteResult, JoinRequest, MembershipResult, RemoveNodeRequest, SnapshotChunk,
    WireWriteError,
};

/// The `tollgate.v1.Raft` service of one node.
pub struct RaftService {
    node: Arc<ConsensusNode>,
    token_sha256: [u8; 32],
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The Raft service of `node`, accepting peers that present
/// `authorization: Bearer <cluster_token>`, with request and response
/// limits of [`MAX_RAFT_MESSAGE_BYTES`]. Serve it with
/// `tonic::transport::Server::builder().add_service(raft_server(..))` on
/// the listener of the node's `raft_addr`.
pub fn raft_server(node: Arc<ConsensusNode>, cluster_token: &str) -> RaftServer<RaftService> {
    RaftServer::new(RaftService::new(node, cluster_token))
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares two hashes without stopping at the first difference, so the
/// answer time says nothing about how much of a guess was right.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode<T: DeserializeOwned>(
    what: &'static str,
    request: &Request<RaftMessage>,
) -> Result<T, Status> {
    wire::decode(what, &request.get_ref().payload)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn reply<T: Serialize>(what: &'static str, value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = wire::encode(what, value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { payload }))
}

impl RaftService {
    /// The service of `node`, accepting `cluster_token`.
    pub fn new(node: Arc<ConsensusNode>, cluster_token: &str) -> Self {
        Self {
            node,
            token_sha256: sha256(cluster_token.as_bytes()),
        }
    }

    fn authenticate(&self, request: &Request<RaftMessage>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing cluster token"))?;
        if same_hash(&sha256(presented.as_bytes()), &self.token_sha256) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong cluster token"))
        }
    }

    /// A deadline for work done on behalf of a peer: `bound` from now.
    fn deadline(bound_ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(bound_ms)
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode("append entries request", &request)?;
        let answer = self.node.raft().append_entries(rpc).await;
        reply("append entries response", &answer)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        let rpc: VoteRequest<NodeId> = decode("vote request", &request)?;
        let answer = self.node.raft().vote(rpc).await;
        reply("vote response", &answer)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        self.node.count_install_snapshot_rpc();
        let chunk: SnapshotChunk = decode("install snapshot request", &request)?;
        let answer = self.node.raft().install_snapshot(chunk.into()).await;
        reply("install snapshot response", &answer)
    }

    async fn client_write(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        let cmd: ConfigCommand = decode("client write request", &request)?;
        // Only on this node: the sender already routed it here as the
        // leader, and a second hop would make the bound hard to reason about.
        let answer: ClientWriteResult = self.node.write(cmd).await.map_err(WireWriteError::from);
        reply("client write response", &answer)
    }

    async fn join(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        let join: JoinRequest = decode("join request", &request)?;
        let answer = if join.forwarded {
            let deadline = Self::deadline(self.node.settings().membership_timeout_ms);
            self.node
                .add_node_here(join.node_id, join.info, deadline)
                .await
        } else {
            self.node.add_node(join.node_id, join.info).await
        };
        let answer: MembershipResult = answer.map_err(WireWriteError::from);
        reply("join response", &answer)
    }

    async fn remove_node(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        let remove: RemoveNodeRequest = decode("remove node request", &request)?;
        let answer = if remove.forwarded {
            let deadline = Self::deadline(self.node.settings().write_timeout_ms);
            self.node.remove_node_here(remove.node_id, deadline).await
        } else {
            self.node.remove_node(remove.node_id).await
        };
        let answer: MembershipResult = answer.map_err(WireWriteError::from);
        reply("remove node response", &answer)
    }

    async fn node_status(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.authenticate(&request)?;
        // The request carries nothing; its payload is not read.
        reply("node status response", &self.node.metrics())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_compare_by_value() {
        let a = sha256(b"token");
        assert!(same_hash(&a, &sha256(b"token")));
        assert!(!same_hash(&a, &sha256(b"tokem")));
    }
}
