//! A Raft network that reaches nobody, for single-node clusters.
//!
//! This module owns [`NoNetwork`], the transport of a node that is alone by
//! design (single-node deployments, tests); clusters use
//! [`crate::grpc_network::GrpcNetwork`]. It must not pretend to deliver
//! anything: every RPC fails as unreachable, so a misconfigured multi-node
//! cluster fails loudly (no elections succeed) instead of silently.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::types::{NodeId, NodeInfo, TypeConfig};

/// The error every [`NoNetwork`] RPC reports.
#[derive(Debug, thiserror::Error)]
#[error("no raft transport configured: node {target} is unreachable")]
pub struct NoTransport {
    /// The node the RPC was for.
    pub target: NodeId,
}

/// A [`RaftNetworkFactory`] whose connections fail every RPC as unreachable.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNetwork;

/// A connection of [`NoNetwork`].
#[derive(Clone, Copy, Debug)]
pub struct NoConnection {
    target: NodeId,
}

impl NoConnection {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, NodeInfo, E> {
        RPCError::Unreachable(Unreachable::new(&NoTransport {
            target: self.target,
        }))
    }
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoConnection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        NoConnection { target }
    }
}

impl RaftNetwork<TypeConfig> for NoConnection {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
