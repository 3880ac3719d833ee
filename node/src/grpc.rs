//! The gRPC services: `tollgate.v1.Edge` and `tollgate.v1.Admin`.
//!
//! Thin adapters: decode, call `NodeState` or `admin`, encode. Bad input
//! becomes INVALID_ARGUMENT and changes nothing.

use std::sync::Arc;

use tollgate_proto::v1 as pb;
use tollgate_proto::v1::admin_server::Admin;
use tollgate_proto::v1::edge_server::Edge;
use tonic::{Request, Response, Status};

use crate::admin;
use crate::api::{self, ApiError};
use crate::roles::Role;
use crate::state::{NodeState, SeatOp};

/// The edge service.
#[derive(Clone)]
pub struct EdgeService {
    state: Arc<NodeState>,
}

impl EdgeService {
    /// Wraps the node state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Edge for EdgeService {
    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = api::check_from_proto(req.into_inner());
        let d = self.state.check(req).await.map_err(ApiError::from)?;
        Ok(Response::new(api::decision_to_proto(&d)))
    }

    async fn report(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = api::check_from_proto(req.into_inner());
        let d = self.state.report(req).await.map_err(ApiError::from)?;
        Ok(Response::new(api::decision_to_proto(&d)))
    }

    async fn acquire_seat(
        &self,
        req: Request<pb::SeatRequest>,
    ) -> Result<Response<pb::SeatResponse>, Status> {
        let req = api::seat_from_proto(req.into_inner(), true)?;
        let d = self
            .state
            .seat(SeatOp::Acquire, &req)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(api::seat_to_proto(&d)))
    }

    async fn renew_seat(
        &self,
        req: Request<pb::SeatRequest>,
    ) -> Result<Response<pb::SeatResponse>, Status> {
        let req = api::seat_from_proto(req.into_inner(), false)?;
        let d = self
            .state
            .seat(SeatOp::Renew, &req)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(api::seat_to_proto(&d)))
    }

    async fn release_seat(
        &self,
        req: Request<pb::SeatRequest>,
    ) -> Result<Response<pb::SeatResponse>, Status> {
        let req = api::seat_from_proto(req.into_inner(), false)?;
        let d = self
            .state
            .seat(SeatOp::Release, &req)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(api::seat_to_proto(&d)))
    }
}

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    state: Arc<NodeState>,
}

impl AdminService {
    /// Wraps the node state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// The authenticated caller, with the `idempotency-key` metadata if sent.
    fn actor<T>(&self, req: &Request<T>, needed: Role) -> Result<admin::Caller, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let name = self
            .state
            .tokens
            .authorize(header, needed)
            .map_err(|e| Status::from(ApiError::from(e)))?
            .actor;
        let key = match req.metadata().get("idempotency-key") {
            Some(v) => Some(v.to_str().map_err(|_| {
                Status::from(ApiError::InvalidArgument(
                    "idempotency key: not printable ASCII".into(),
                ))
            })?),
            None => None,
        };
        Ok(admin::Caller::new(name, key)?)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let applied = admin::apply_documents(&self.state, &actor, &r.document, &r.reason).await?;
        let version = applied.iter().map(|a| a.version).max().unwrap_or(0);
        Ok(Response::new(pb::ApplyResponse {
            applied: applied
                .into_iter()
                .map(|a| pb::AppliedDocument {
                    kind: a.kind.to_string(),
                    id: a.id,
                    version: a.version,
                })
                .collect(),
            version,
        }))
    }

    async fn put_license(
        &self,
        req: Request<pb::PutLicenseRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version =
            admin::put_license(&self.state, &actor, &r.id, &r.document, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn get_license(
        &self,
        req: Request<pb::GetLicenseRequest>,
    ) -> Result<Response<pb::LicenseResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let (lic, version) = admin::get_license(&self.state, &req.into_inner().id)?;
        let license_json = serde_json::to_string_pretty(&*lic)
            .map_err(|e| Status::from(ApiError::Internal(e.to_string())))?;
        Ok(Response::new(pb::LicenseResponse {
            license_json,
            version,
        }))
    }

    async fn list_licenses(
        &self,
        req: Request<pb::ListLicensesRequest>,
    ) -> Result<Response<pb::ListLicensesResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let config = self.state.config();
        let licenses = config
            .licenses
            .values()
            .map(|l| admin::summary(l))
            .collect();
        Ok(Response::new(pb::ListLicensesResponse {
            licenses,
            version: config.version,
        }))
    }

    async fn revoke_license(
        &self,
        req: Request<pb::RevokeLicenseRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version = admin::revoke(&self.state, &actor, &r.id, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn issue_key(
        &self,
        req: Request<pb::IssueKeyRequest>,
    ) -> Result<Response<pb::IssueKeyResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let k = admin::issue_key(&self.state, &actor, &r.license_id, &r.name, &r.reason).await?;
        Ok(Response::new(pb::IssueKeyResponse {
            key: k.key,
            key_id: k.key_id,
            version: k.version,
        }))
    }

    async fn put_model(
        &self,
        req: Request<pb::PutModelRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version = admin::put_model(&self.state, &actor, &r.id, &r.document, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        Ok(Response::new(pb::StatusResponse {
            status_json: self.state.status_json().to_string(),
        }))
    }

    async fn license_history(
        &self,
        req: Request<pb::LicenseHistoryRequest>,
    ) -> Result<Response<pb::LicenseHistoryResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let (records, version) = admin::history(&self.state, &req.into_inner().id)?;
        Ok(Response::new(pb::LicenseHistoryResponse {
            history_json: records.to_string(),
            version,
        }))
    }

    async fn model_history(
        &self,
        req: Request<pb::ModelHistoryRequest>,
    ) -> Result<Response<pb::LicenseHistoryResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let (records, version) = admin::model_history(&self.state, &req.into_inner().id)?;
        Ok(Response::new(pb::LicenseHistoryResponse {
            history_json: records.to_string(),
            version,
        }))
    }

    async fn rollback_license(
        &self,
        req: Request<pb::RollbackLicenseRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version = admin::rollback(&self.state, &actor, &r.id, r.to_version, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version =
            admin::revoke_key(&self.state, &actor, &r.license_id, &r.key_id, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let cluster = admin::cluster_status(&self.state).await;
        Ok(Response::new(pb::ClusterStatusResponse {
            cluster_json: cluster.to_string(),
        }))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let version = admin::remove_node(&self.state, &actor, r.node_id, &r.reason).await?;
        Ok(Response::new(pb::WriteResponse { version }))
    }

    async fn list_exceptions(
        &self,
        req: Request<pb::ListExceptionsRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let r = req.into_inner();
        let v = admin::list_exceptions(&self.state, non_empty(&r.license), non_empty(&r.state));
        Ok(governance_response(&v))
    }

    async fn request_exception(
        &self,
        req: Request<pb::RequestExceptionRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let requested_until_ms = match non_empty(&r.requested_until) {
            Some(t) => Some(admin::parse_until(t, self.state.now_ms())?),
            None => None,
        };
        let ask = admin::ExceptionAsk {
            license: r.license_id,
            quota: r.quota_id,
            amount: r.amount,
            reason: r.reason,
            requested_until_ms,
        };
        let v = admin::request_exception(&self.state, &actor, ask).await?;
        Ok(governance_response(&v))
    }

    async fn approve_exception(
        &self,
        req: Request<pb::ApproveExceptionRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let until = non_empty(&r.until)
            .ok_or_else(|| Status::from(ApiError::InvalidArgument("until: required".into())))?;
        let until_ms = admin::parse_until(until, self.state.now_ms())?;
        let v = admin::approve_exception(&self.state, &actor, &r.id, until_ms, &r.reason).await?;
        Ok(governance_response(&v))
    }

    async fn reject_exception(
        &self,
        req: Request<pb::RejectExceptionRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let v = admin::reject_exception(&self.state, &actor, &r.id, &r.reason).await?;
        Ok(governance_response(&v))
    }

    async fn list_escalations(
        &self,
        req: Request<pb::ListEscalationsRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        self.actor(&req, Role::Viewer)?;
        let r = req.into_inner();
        let v = admin::list_escalations(&self.state, non_empty(&r.license), non_empty(&r.status));
        Ok(governance_response(&v))
    }

    async fn acknowledge_escalation(
        &self,
        req: Request<pb::EscalationActionRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let v = admin::update_escalation(&self.state, &actor, &r.id, false, &r.reason).await?;
        Ok(governance_response(&v))
    }

    async fn resolve_escalation(
        &self,
        req: Request<pb::EscalationActionRequest>,
    ) -> Result<Response<pb::GovernanceResponse>, Status> {
        let actor = self.actor(&req, Role::Admin)?;
        let r = req.into_inner();
        let v = admin::update_escalation(&self.state, &actor, &r.id, true, &r.reason).await?;
        Ok(governance_response(&v))
    }
}

/// `None` for an empty proto string (proto3 has no absent strings).
fn non_empty(text: &str) -> Option<&str> {
    let t = text.trim();
    (!t.is_empty()).then_some(t)
}

fn governance_response(v: &serde_json::Value) -> Response<pb::GovernanceResponse> {
    Response::new(pb::GovernanceResponse {
        json: v.to_string(),
    })
}
