//! The HTTP/JSON API: the edge endpoints (`/v1/check`, `/v1/report`), the
//! admin endpoints (`/v1/licenses`, `/v1/models`, `/v1/datasets`,
//! `/v1/apply`, `/v1/lineage`), quota exceptions (`/v1/exceptions`, which an
//! edge caller may also ask with its license's API key), escalations
//! (`/v1/escalations`), the audit log (`/v1/audit`, JSON Lines;
//! `/v1/audit/verify`), status, `/metrics` (Prometheus text format) and
//! `/dashboard` (HTML).
//!
//! Same contract as gRPC (see `api`): snake_case fields, the same reason
//! codes. Bodies over `MAX_BODY_BYTES` get 413; malformed ones get 400 with
//! a reason; a missing or wrong token gets 401, and a token whose role is too low
//! (see `roles`) gets 403. None of them changes
//! state.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;

use crate::admin;
use crate::api::{self, ApiError, DecisionJson};
use crate::audit::export::{self, ExportCursor, ExportQuery};
use crate::audit::verify;
use crate::dashboard;
use crate::lineage;
use crate::metrics::exposition::CONTENT_TYPE as METRICS_CONTENT_TYPE;
use crate::persist::run_storage;
use crate::roles::{Principal, Role};
use crate::settings::MAX_BODY_BYTES;
use crate::state::{NodeState, SeatOp};

type AppState = Arc<NodeState>;

/// Builds the HTTP router for one node.
pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/v1/check", post(check))
        .route("/v1/report", post(report))
        .route("/v1/apply", post(apply))
        .route("/v1/licenses", get(list_licenses))
        .route("/v1/licenses/{id}", put(put_license).get(get_license))
        .route("/v1/licenses/{id}/revoke", post(revoke))
        .route("/v1/licenses/{id}/keys", post(issue_key))
        .route("/v1/licenses/{id}/keys/{key_id}/revoke", post(revoke_key))
        .route("/v1/licenses/{id}/history", get(history))
        .route("/v1/licenses/{id}/rollback", post(rollback))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/nodes/{node_id}", delete(remove_node))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", put(put_model))
        .route("/v1/models/{id}/history", get(model_history))
        .route("/v1/datasets", get(list_datasets))
        .route(
            "/v1/datasets/{id}",
            put(put_dataset).get(get_dataset).delete(delete_dataset),
        )
        .route("/v1/datasets/{id}/history", get(dataset_history))
        .route("/v1/lineage", get(lineage_graph))
        .route("/v1/status", get(status))
        .route("/v1/usage", get(usage))
        .route("/v1/seats/acquire", post(seat_acquire))
        .route("/v1/seats/renew", post(seat_renew))
        .route("/v1/seats/release", post(seat_release))
        .route("/v1/admin/gossip/faults", post(gossip_faults))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/login", post(dashboard_login))
        .route(
            "/v1/exceptions",
            post(request_exception).get(list_exceptions),
        )
        .route("/v1/exceptions/{id}", get(get_exception))
        .route("/v1/exceptions/{id}/approve", post(approve_exception))
        .route("/v1/exceptions/{id}/reject", post(reject_exception))
        .route("/v1/escalations", get(list_escalations))
        .route("/v1/escalations/{id}", get(get_escalation))
        .route(
            "/v1/escalations/{id}/acknowledge",
            post(acknowledge_escalation),
        )
        .route("/v1/escalations/{id}/resolve", post(resolve_escalation))
        .route("/v1/audit", get(audit_export))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/healthz", get(|| async { "ok" }))
        .route_layer(axum::middleware::from_fn(trace_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Whether `route` is on the edge hot path (traced at debug level only).
fn is_edge_route(route: &str) -> bool {
    route == "/v1/check" || route == "/v1/report" || route.starts_with("/v1/seats/")
}

/// One span per request, named by its route template: never the URI
/// itself, whose query may carry a dashboard token.
async fn trace_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let route = route.as_ref().map_or("", |r| r.as_str());
    let method = req.method().clone();
    let span = if is_edge_route(route) {
        tracing::debug_span!("http", %method, route, status = tracing::field::Empty)
    } else {
        tracing::info_span!("http", %method, route, status = tracing::field::Empty)
    };
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        (status, axum::Json(body)).into_response()
    }
}

fn decision_response(d: &tollgate_quota::decision::Decision) -> Response {
    let json = DecisionJson::from(d);
    let retry = json.retry_after_ms;
    let mut resp = axum::Json(json).into_response();
    if let Some(ms) = retry {
        // Retry-After is in whole seconds; round up so a client never retries early.
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

async fn check(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse(&state, &body)?;
    let d = state.check(req).await.map_err(ApiError::from)?;
    Ok(decision_response(&d))
}

async fn report(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse(&state, &body)?;
    let d = state.report(req).await.map_err(ApiError::from)?;
    Ok(decision_response(&d))
}

/// Parses an edge JSON body, counting a malformed one as invalid.
fn parse(
    state: &NodeState,
    body: &Bytes,
) -> Result<tollgate_quota::request::CheckRequest, ApiError> {
    api::parse_check_json(body, state.strict_fields).inspect_err(|_| {
        state
            .stats
            .n_invalid
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
}

/// The authenticated caller, if its token holds at least `needed`, with the
/// `Idempotency-Key` header if sent.
fn actor(state: &NodeState, headers: &HeaderMap, needed: Role) -> Result<admin::Caller, ApiError> {
    let name = authorize(state, headers, needed)?.actor;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::InvalidArgument("idempotency key: not printable ASCII".into())
        })?),
        None => None,
    };
    admin::Caller::new(name, key)
}

/// The caller, if the `Authorization` header carries a token of at least
/// `needed`: 401 without a known token, 403 with one of a lower role.
pub(crate) fn authorize(
    state: &NodeState,
    headers: &HeaderMap,
    needed: Role,
) -> Result<Principal, ApiError> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(state.tokens.authorize(auth, needed)?)
}

fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::InvalidArgument("body is not UTF-8".into()))
}

/// The change reason: `?reason=` or the `x-tollgate-reason` header.
fn reason(query: &HashMap<String, String>, headers: &HeaderMap) -> String {
    query
        .get("reason")
        .cloned()
        .or_else(|| {
            headers
                .get("x-tollgate-reason")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

async fn apply(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let applied =
        admin::apply_documents(&state, &actor, body_text(&body)?, &reason(&q, &headers)).await?;
    let version = applied.iter().map(|a| a.version).max().unwrap_or(0);
    Ok(axum::Json(serde_json::json!({"applied": applied, "version": version})).into_response())
}

async fn put_license(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let version = admin::put_license(
        &state,
        &actor,
        &id,
        body_text(&body)?,
        &reason(&q, &headers),
    )
    .await?;
    Ok(axum::Json(serde_json::json!({"id": id, "version": version})).into_response())
}

async fn get_license(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let (lic, version) = admin::get_license(&state, &id)?;
    Ok(axum::Json(serde_json::json!({"license": &*lic, "version": version})).into_response())
}

async fn list_licenses(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let config = state.config();
    let licenses: Vec<_> = config
        .licenses
        .values()
        .map(|l| {
            let s = admin::summary(l);
            serde_json::json!({
                "id": s.id, "customer": s.customer, "tier": s.tier, "status": s.status,
                "n_keys": s.n_keys, "n_quotas": s.n_quotas,
            })
        })
        .collect();
    Ok(
        axum::Json(serde_json::json!({"licenses": licenses, "version": config.version}))
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    to_version: Option<u64>,
}

impl ActionBody {
    /// The body's reason, else `?reason=` or the reason header.
    fn reason_or(self, query: &HashMap<String, String>, headers: &HeaderMap) -> String {
        if self.reason.is_empty() {
            reason(query, headers)
        } else {
            self.reason
        }
    }
}

fn action_body(body: &Bytes) -> Result<ActionBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid body: {e}")))
}

async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let why = action_body(&body)?.reason_or(&q, &headers);
    let version = admin::revoke(&state, &actor, &id, &why).await?;
    Ok(
        axum::Json(serde_json::json!({"id": id, "status": "revoked", "version": version}))
            .into_response(),
    )
}

async fn issue_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let b = action_body(&body)?;
    let name = b.name.clone();
    let why = b.reason_or(&q, &headers);
    let k = admin::issue_key(&state, &actor, &id, &name, &why).await?;
    Ok(axum::Json(serde_json::json!({
        "license": id, "key": k.key, "key_id": k.key_id, "version": k.version,
        "note": "store this key now: it is not shown again",
    }))
    .into_response())
}

async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let config = state.config();
    let models: Vec<_> = config.models.values().map(|m| &**m).collect();
    Ok(
        axum::Json(serde_json::json!({"models": models, "version": config.version}))
            .into_response(),
    )
}

async fn put_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let version = admin::put_model(
        &state,
        &actor,
        &id,
        body_text(&body)?,
        &reason(&q, &headers),
    )
    .await?;
    Ok(axum::Json(serde_json::json!({"id": id, "version": version})).into_response())
}

async fn status(State(state): State<AppState>) -> Response {
    axum::Json(state.status_json()).into_response()
}

async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let license = q.get("license").map(String::as_str);
    Ok(axum::Json(state.usage_json(license)).into_response())
}

async fn seat(state: &NodeState, op: SeatOp, body: &Bytes) -> Result<Response, ApiError> {
    let req = api::parse_seat_json(body, op == SeatOp::Acquire)?;
    let d = state.seat(op, &req).await?;
    let retry = d.retry_after_ms;
    let mut resp = axum::Json(d).into_response();
    if let Some(ms) = retry
        && let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Ok(resp)
}

async fn seat_acquire(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    seat(&state, SeatOp::Acquire, &body).await
}

async fn seat_renew(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    seat(&state, SeatOp::Renew, &body).await
}

async fn seat_release(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    seat(&state, SeatOp::Release, &body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    drop: Vec<u64>,
}

/// Test hook: drop gossip to and from the listed peers (empty heals).
async fn gossip_faults(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Admin)?;
    let gossip = state
        .gossip
        .get()
        .ok_or_else(|| ApiError::Unavailable("gossip is not running".into()))?;
    if !gossip.fault_injection() {
        return Err(ApiError::FaultInjectionDisabled);
    }
    let req: FaultsBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid faults body: {e}")))?;
    let dropped: std::collections::BTreeSet<u64> = req.drop.into_iter().collect();
    tracing::warn!(
        ?dropped,
        "fault injection: dropping gossip to and from these peers"
    );
    gossip.set_dropped(dropped.clone());
    Ok(axum::Json(serde_json::json!({"dropped": dropped})).into_response())
}

async fn revoke_key(
    State(state): State<AppState>,
    Path((id, key_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let why = action_body(&body)?.reason_or(&q, &headers);
    let version = admin::revoke_key(&state, &actor, &id, &key_id, &why).await?;
    Ok(axum::Json(
        serde_json::json!({"license": id, "key_id": key_id, "status": "revoked", "version": version}),
    )
    .into_response())
}

async fn history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let (records, version) = admin::history(&state, &id)?;
    Ok(
        axum::Json(serde_json::json!({"license": id, "history": records, "version": version}))
            .into_response(),
    )
}

async fn rollback(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let b = action_body(&body)?;
    let to_version = b
        .to_version
        .or_else(|| q.get("to_version").and_then(|v| v.parse().ok()))
        .ok_or_else(|| ApiError::InvalidArgument("to_version: required".into()))?;
    let why = b.reason_or(&q, &headers);
    let version = admin::rollback(&state, &actor, &id, to_version, &why).await?;
    Ok(
        axum::Json(serde_json::json!({"id": id, "rolled_back_to": to_version, "version": version}))
            .into_response(),
    )
}

async fn cluster(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    Ok(axum::Json(admin::cluster_status(&state).await).into_response())
}

async fn remove_node(
    State(state): State<AppState>,
    Path(node_id): Path<u64>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let version = admin::remove_node(&state, &actor, node_id, &reason(&q, &headers)).await?;
    Ok(axum::Json(serde_json::json!({"removed": node_id, "version": version})).into_response())
}

async fn model_history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let (records, version) = admin::model_history(&state, &id)?;
    Ok(
        axum::Json(serde_json::json!({"model": id, "history": records, "version": version}))
            .into_response(),
    )
}

async fn list_datasets(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let config = state.config();
    let datasets: Vec<_> = config.datasets.values().map(|d| &**d).collect();
    Ok(
        axum::Json(serde_json::json!({"datasets": datasets, "version": config.version}))
            .into_response(),
    )
}

async fn put_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let version = admin::put_dataset(
        &state,
        &actor,
        &id,
        body_text(&body)?,
        &reason(&q, &headers),
    )
    .await?;
    Ok(axum::Json(serde_json::json!({"id": id, "version": version})).into_response())
}

async fn get_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let (dataset, version) = admin::get_dataset(&state, &id)?;
    Ok(axum::Json(serde_json::json!({"dataset": &*dataset, "version": version})).into_response())
}

async fn delete_dataset(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let actor = actor(&state, &headers, Role::Admin)?;
    let version = admin::delete_dataset(&state, &actor, &id, &reason(&q, &headers)).await?;
    Ok(
        axum::Json(serde_json::json!({"id": id, "deleted": true, "version": version}))
            .into_response(),
    )
}

async fn dataset_history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let (records, version) = admin::dataset_history(&state, &id)?;
    Ok(
        axum::Json(serde_json::json!({"dataset": id, "history": records, "version": version}))
            .into_response(),
    )
}

/// `GET /v1/lineage?license=L[&format=json|dot|openlineage]`: this node's
/// view of the license's lineage graph. A viewer token.
async fn lineage_graph(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let format = lineage::Format::parse(q.get("format").map(String::as_str))?;
    let license = q
        .get("license")
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::InvalidArgument("license: required".into()))?;
    let config = state.config();
    let graph = state.lineage_graph(license);
    // A license the config no longer holds still shows the edges it left
    // (until usage GC drops them); one never heard of is not found.
    if graph.is_empty() && config.license(license).is_none() {
        return Err(ApiError::NotFound(format!("license `{license}` not found")));
    }
    Ok(match format {
        lineage::Format::Json => {
            axum::Json(lineage::to_json(&graph, &config, state.node_id)).into_response()
        }
        lineage::Format::OpenLineage => {
            axum::Json(lineage::to_openlineage(&graph, &config, state.now_ms())).into_response()
        }
        lineage::Format::Dot => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/vnd.graphviz; charset=utf-8"),
            )],
            lineage::to_dot(&graph, &config),
        )
            .into_response(),
    })
}

/// `GET /metrics`: open unless `metrics.require_token`, then a viewer token.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if state.metrics.settings().require_token {
        authorize(&state, &headers, Role::Viewer)?;
    }
    let body = state.metrics.render(&state);
    Ok((
        [
            (header::CONTENT_TYPE, METRICS_CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// Headers on every dashboard answer: never cached, never framed, no
/// scripts, and no referrer (a URL that carried `?token=` leaks nowhere).
fn html_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

fn sign_in(state: &NodeState, status: StatusCode, message: &str) -> Response {
    html_response(status, dashboard::sign_in_page(state.node_id, message))
}

/// Trades a token for a dashboard session: a cookie, and a redirect to the
/// bare `/dashboard` so the token leaves the address bar and history.
fn open_session(state: &NodeState, token: &str) -> Response {
    match state.tokens.authorize_token(token, Role::Viewer) {
        Ok(p) => {
            let id = state.dashboard.open_session(&p.actor, state.now_ms());
            let mut resp = StatusCode::SEE_OTHER.into_response();
            let h = resp.headers_mut();
            h.insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            if let Ok(v) = HeaderValue::from_str(&dashboard::session_cookie(state.node_id, &id)) {
                h.insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(crate::roles::AuthError::Forbidden { .. }) => sign_in(
            state,
            StatusCode::FORBIDDEN,
            "That token's role may not open the dashboard.",
        ),
        Err(crate::roles::AuthError::Unauthenticated) => sign_in(
            state,
            StatusCode::UNAUTHORIZED,
            "That token is not known to this node.",
        ),
    }
}

/// `GET /dashboard`: with a bearer header, a session cookie, or `?token=`
/// once (see `dashboard`).
async fn dashboard(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(token) = q.get("token") {
        return open_session(&state, token);
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return match authorize(&state, &headers, Role::Viewer) {
            Ok(p) => html_response(StatusCode::OK, dashboard::render_page(&state, &p.actor)),
            Err(e) => {
                let status =
                    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
                sign_in(
                    &state,
                    status,
                    "The token in the Authorization header is not a viewer token.",
                )
            }
        };
    }
    let session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| dashboard::session_from_cookies(state.node_id, c))
        .and_then(|id| state.dashboard.session(id, state.now_ms()));
    match session {
        Some(actor) => html_response(StatusCode::OK, dashboard::render_page(&state, &actor)),
        None => sign_in(
            &state,
            StatusCode::UNAUTHORIZED,
            "The dashboard needs a viewer token.",
        ),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /dashboard/login`: the sign-in form, token in the body.
async fn dashboard_login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    open_session(&state, &form.token)
}

/// `POST /v1/exceptions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExceptionBody {
    /// The license's API key, for an edge caller; an administrator sends
    /// an `Authorization` header instead.
    #[serde(default)]
    key: Option<String>,
    /// License id; optional with a key (the key names its license).
    #[serde(default)]
    license: Option<String>,
    quota: String,
    amount: u64,
    reason: String,
    /// RFC 3339, or a duration from now such as `7d`.
    #[serde(default)]
    requested_until: Option<String>,
}

/// Who may ask for an exception: an admin token (`Authorization`), or the
/// API key of the license asked about (`key` in the body), recorded as
/// `key:<key name>` (never the key).
fn exception_caller(
    state: &NodeState,
    headers: &HeaderMap,
    body: &ExceptionBody,
) -> Result<(admin::Caller, String), ApiError> {
    let idempotency = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::InvalidArgument("idempotency key: not printable ASCII".into())
        })?),
        None => None,
    };
    match (&body.key, headers.contains_key(header::AUTHORIZATION)) {
        (Some(_), true) => Err(ApiError::InvalidArgument(
            "send either an Authorization header or a key, not both".into(),
        )),
        (None, true) => {
            let principal = authorize(state, headers, Role::Admin)?;
            let license = body
                .license
                .clone()
                .ok_or_else(|| ApiError::InvalidArgument("license: required".into()))?;
            Ok((admin::Caller::new(principal.actor, idempotency)?, license))
        }
        (Some(key), false) => {
            let config = state.config();
            let hash = tollgate_quota::keys::hash_key(key);
            let license = config
                .license_by_key_hash(&hash)
                .ok_or(ApiError::Unauthenticated)?;
            if body.license.as_ref().is_some_and(|l| *l != license.id) {
                return Err(ApiError::Forbidden(
                    "this key belongs to another license".into(),
                ));
            }
            let name = license
                .keys
                .iter()
                .find(|k| k.sha256 == hash)
                .and_then(|k| k.id.clone())
                .unwrap_or_else(|| hash[..8].to_string());
            let actor = format!("key:{name}");
            Ok((admin::Caller::new(actor, idempotency)?, license.id.clone()))
        }
        (None, false) => Err(ApiError::Unauthenticated),
    }
}

async fn request_exception(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: ExceptionBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid body: {e}")))?;
    let (caller, license) = exception_caller(&state, &headers, &b)?;
    let requested_until_ms = match &b.requested_until {
        Some(t) => Some(admin::parse_until(t, state.now_ms())?),
        None => None,
    };
    let ask = admin::ExceptionAsk {
        license,
        quota: b.quota,
        amount: b.amount,
        reason: b.reason,
        requested_until_ms,
    };
    let e = admin::request_exception(&state, &caller, ask).await?;
    Ok((StatusCode::CREATED, axum::Json(e)).into_response())
}

async fn list_exceptions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let license = q.get("license").map(String::as_str);
    let wanted = q.get("state").map(String::as_str);
    Ok(axum::Json(admin::list_exceptions(&state, license, wanted)).into_response())
}

async fn get_exception(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    Ok(axum::Json(admin::exception_json(&state, &id)?).into_response())
}

/// The body of approve, reject, acknowledge and resolve calls.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    reason: String,
}

fn decide_body(body: &Bytes) -> Result<DecideBody, ApiError> {
    let b: DecideBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecideBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid body: {e}")))?
    };
    if b.reason.len() > tollgate_quota::governance::MAX_REASON_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "reason: at most {} bytes",
            tollgate_quota::governance::MAX_REASON_LEN
        )));
    }
    Ok(b)
}

async fn approve_exception(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = actor(&state, &headers, Role::Admin)?;
    let b = decide_body(&body)?;
    let until = b
        .until
        .as_deref()
        .ok_or_else(|| ApiError::InvalidArgument("until: required".into()))?;
    let until_ms = admin::parse_until(until, state.now_ms())?;
    let e = admin::approve_exception(&state, &caller, &id, until_ms, &b.reason).await?;
    Ok(axum::Json(e).into_response())
}

async fn reject_exception(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = actor(&state, &headers, Role::Admin)?;
    let b = decide_body(&body)?;
    if b.until.is_some() {
        return Err(ApiError::InvalidArgument(
            "until: only an approval has one".into(),
        ));
    }
    let e = admin::reject_exception(&state, &caller, &id, &b.reason).await?;
    Ok(axum::Json(e).into_response())
}

async fn list_escalations(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    let license = q.get("license").map(String::as_str);
    let status = q.get("status").map(String::as_str);
    Ok(axum::Json(admin::list_escalations(&state, license, status)).into_response())
}

async fn get_escalation(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    actor(&state, &headers, Role::Viewer)?;
    Ok(axum::Json(admin::escalation_json(&state, &id)?).into_response())
}

async fn update_escalation(
    state: &NodeState,
    headers: &HeaderMap,
    id: &str,
    body: &Bytes,
    resolve: bool,
) -> Result<Response, ApiError> {
    let caller = actor(state, headers, Role::Admin)?;
    let b = decide_body(body)?;
    if b.until.is_some() {
        return Err(ApiError::InvalidArgument(
            "until: escalations have none".into(),
        ));
    }
    let e = admin::update_escalation(state, &caller, id, resolve, &b.reason).await?;
    Ok(axum::Json(e).into_response())
}

async fn acknowledge_escalation(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_escalation(&state, &headers, &id, &body, false).await
}

async fn resolve_escalation(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_escalation(&state, &headers, &id, &body, true).await
}

/// The audit log of a node that keeps one, or 404.
fn audit_store(state: &NodeState) -> Result<crate::audit::store::AuditStore, ApiError> {
    state.audit.store().cloned().ok_or_else(|| {
        ApiError::NotFound("the audit trail is disabled on this node (audit.enabled: false)".into())
    })
}

/// `since` (RFC 3339 or unix ms), `after_seq` and `limit`; anything else is
/// a 400, so a typo never silently exports everything.
fn export_query(q: &HashMap<String, String>) -> Result<ExportQuery, ApiError> {
    let mut query = ExportQuery::default();
    for (name, value) in q {
        match name.as_str() {
            "since" => {
                query.since_ms = Some(
                    export::parse_time(value)
                        .map_err(|e| ApiError::InvalidArgument(format!("since: {e}")))?,
                );
            }
            "after_seq" => {
                query.after_seq = value.parse().map_err(|_| {
                    ApiError::InvalidArgument("after_seq: must be a record number".into())
                })?;
            }
            "limit" => {
                let limit: usize = value
                    .parse()
                    .map_err(|_| ApiError::InvalidArgument("limit: must be a number".into()))?;
                if !(1..=export::MAX_EXPORT_LIMIT).contains(&limit) {
                    return Err(ApiError::InvalidArgument(format!(
                        "limit: must be 1 to {}",
                        export::MAX_EXPORT_LIMIT
                    )));
                }
                query.limit = limit;
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown parameter `{other}` (since, after_seq, limit)"
                )));
            }
        }
    }
    Ok(query)
}

/// Chunks of an export in flight to one client.
const EXPORT_STREAM_CHUNKS: usize = 4;

/// `GET /v1/audit`: this node's audit records as JSON Lines, oldest first,
/// each signed checkpoint after the record it covers. Needs `auditor`.
/// Streams; page on with `after_seq` = the last `seq` received.
async fn audit_export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Auditor)?;
    let query = export_query(&q)?;
    let store = audit_store(&state)?;
    let blocking = state.audit.needs_blocking_thread();
    let s = store.clone();
    let cursor = run_storage(blocking, move || ExportCursor::start(&s, &query))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("reading the audit log: {e}")))?;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(EXPORT_STREAM_CHUNKS);
    tokio::spawn(async move {
        let mut cursor = cursor;
        loop {
            let s = store.clone();
            let step = run_storage(blocking, move || {
                let chunk = cursor.next_chunk(&s);
                (cursor, chunk)
            })
            .await;
            let (next, chunk) = match step {
                Ok(pair) => pair,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            cursor = next;
            let item = match chunk {
                Ok(Some(chunk)) => Ok(Bytes::from(chunk)),
                Ok(None) => return,
                Err(e) => Err(std::io::Error::other(format!("reading the audit log: {e}"))),
            };
            let failed = item.is_err();
            // A client that went away ends the export.
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        body,
    )
        .into_response())
}

/// `GET /v1/audit/verify`: verifies this node's audit log (chain, gaps,
/// checkpoint signatures against the key the replicated config holds for
/// this node) and returns the report. Needs `auditor`.
async fn audit_verify(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Auditor)?;
    let store = audit_store(&state)?;
    let local = state
        .audit
        .public_key()
        .map(|k| (k, "this node's signing key".to_string()))
        .into_iter()
        .collect();
    let trusted = verify::trusted_keys_for(Some(&state.config()), Some(state.node_id), local);
    let report = run_storage(state.audit.needs_blocking_thread(), move || {
        verify::verify(&store, &trusted)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("reading the audit log: {e}")))?;
    Ok(axum::Json(report).into_response())
}
