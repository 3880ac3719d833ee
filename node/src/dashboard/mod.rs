//! The operator dashboard at `GET /dashboard`: one server-rendered HTML page
//! with inline SVG charts, no scripts and no external assets, refreshed by
//! a `<meta http-equiv="refresh">`.
//!
//! It shows what this node sees: decision totals and latency, per-license
//! quota utilisation over time (from the sampler's history, see
//! `metrics::history`), blocked attempts by reason, dataset violations
//! (reason codes starting with `dataset_` or `lineage_`), cluster health
//! (members, leader, gossip lag), and any section other parts of the node
//! add with [`Dashboard::add_section`].
//!
//! Access needs a `viewer` token. A browser cannot send a bearer header on
//! navigation, so the page also takes the token once, as `?token=` or from
//! its sign-in form, trades it for a session id and redirects to the bare
//! URL; the session id travels in an HttpOnly, SameSite=Strict cookie
//! scoped to `/dashboard`. Sessions live in this node's memory only
//! ([`MAX_SESSIONS`], [`SESSION_TTL_MS`]), and a session grants the
//! dashboard and nothing else. Tokens and session ids are never logged.

pub mod html;
pub mod svg;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tollgate_quota::decision::ReasonCode;

use crate::metrics::history::History;
use crate::state::NodeState;
use html::Html;
use svg::{Axes, Series};

/// How long a dashboard session lasts (ms).
pub const SESSION_TTL_MS: i64 = 12 * 60 * 60 * 1000;

/// Most dashboard sessions a node keeps; the one closest to expiry makes
/// room for a new one.
pub const MAX_SESSIONS: usize = 256;

/// Most licenses charted, busiest first.
pub const MAX_LICENSE_CHARTS: usize = 24;

/// Reason codes with these prefixes are dataset and lineage violations.
pub const DATASET_REASON_PREFIXES: [&str; 2] = ["dataset_", "lineage_"];

/// A part of the page another module renders (audit backlog, escalations,
/// ...). Sections appear after the built-in ones, in the order added.
pub trait DashboardSection: Send + Sync {
    /// The section's heading.
    fn title(&self) -> String;
    /// Writes the section's body. Pass every string that is not the code's
    /// own markup through [`Html::text`].
    fn render(&self, state: &NodeState, out: &mut Html);
}

struct Session {
    actor: String,
    expires_at_ms: i64,
}

/// Dashboard sessions and extra sections. See the module documentation.
#[derive(Default)]
pub struct Dashboard {
    /// By SHA-256 of the session id: the id itself is kept nowhere.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    sections: RwLock<Vec<Arc<dyn DashboardSection>>>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("sessions", &self.sessions.lock().len())
            .field("sections", &self.sections.read().len())
            .finish()
    }
}

impl Dashboard {
    /// Adds a section to the page.
    pub fn add_section(&self, section: Arc<dyn DashboardSection>) {
        self.sections.write().push(section);
    }

    /// Opens a session for `actor`; returns the session id for the cookie.
    pub fn open_session(&self, actor: &str, now_ms: i64) -> String {
        let mut id = [0u8; 32];
        // A secret: from the OS, not from the replayable source.
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let id = hex::encode(id);
        let mut sessions = self.sessions.lock();
        sessions.retain(|_, s| s.expires_at_ms > now_ms);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            Sha256::digest(id.as_bytes()).into(),
            Session {
                actor: actor.to_string(),
                expires_at_ms: now_ms.saturating_add(SESSION_TTL_MS),
            },
        );
        id
    }

    /// The actor of a live session.
    pub fn session(&self, id: &str, now_ms: i64) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(id.trim().as_bytes()).into();
        self.sessions
            .lock()
            .get(&digest)
            .filter(|s| s.expires_at_ms > now_ms)
            .map(|s| s.actor.clone())
    }
}

/// The session cookie's name. It names the node, since browsers share
/// cookies between ports of one host and several nodes may run on one.
pub fn cookie_name(node_id: u64) -> String {
    format!("tollgate_dashboard_{node_id}")
}

/// The `Set-Cookie` value that carries a session.
pub fn session_cookie(node_id: u64, session_id: &str) -> String {
    format!(
        "{}={session_id}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}",
        cookie_name(node_id),
        SESSION_TTL_MS / 1000
    )
}

/// The session id in a `Cookie` header, if any.
pub fn session_from_cookies(node_id: u64, cookie_header: &str) -> Option<&str> {
    let name = cookie_name(node_id);
    cookie_header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v.trim())
    })
}

/// Seconds between refreshes: the sampling interval, at least 2 s.
pub fn refresh_secs(state: &NodeState) -> u64 {
    state
        .metrics
        .settings()
        .sample_interval_ms
        .div_ceil(1000)
        .max(2)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f5f6f8;color:#111827}\
header{background:#111827;color:#f9fafb;padding:12px 20px}header h1{font-size:20px;margin:0}header p{margin:4px 0 0;color:#d1d5db}\
main{padding:12px 20px;display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:14px}\
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 14px}section h2{font-size:16px;margin:0 0 8px}\
section.wide{grid-column:1/-1}.tiles{display:flex;flex-wrap:wrap;gap:10px}\
.tile{border:1px solid #e5e7eb;border-radius:6px;padding:8px 12px;min-width:120px}.tile .label{color:#6b7280;font-size:12px}.tile .value{font-size:22px;font-weight:600}\
.licenses{display:grid;grid-template-columns:repeat(auto-fill,minmax(570px,1fr));gap:6px 18px}figure{margin:0 0 12px}figcaption{font-weight:600;margin-bottom:4px}table{border-collapse:collapse;font-size:13px}\
th,td{padding:2px 10px 2px 0;text-align:left}td.n,th.n{text-align:right}.muted{color:#6b7280}\
.chart text{font-size:11px;fill:#4b5563}.chart .grid{stroke:#e5e7eb}.chart .rule{stroke:#dc2626;stroke-dasharray:4 3}\
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;border-radius:2px}\
footer{padding:6px 20px 16px;color:#6b7280;font-size:12px}form input{font:inherit;padding:4px;width:420px}";

fn time_of_day(ms: f64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%H:%M:%S").to_string())
        .unwrap_or_default()
}

fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

fn seconds(v: f64) -> String {
    if v.is_nan() {
        "–".to_string()
    } else if v < 0.001 {
        format!("{:.0} µs", v * 1e6)
    } else {
        format!("{:.2} ms", v * 1e3)
    }
}

fn tile(out: &mut Html, key: &str, label: &str, value: impl std::fmt::Display) {
    out.markup("<div class=\"tile\" data-metric=\"")
        .text(key)
        .markup("\"><div class=\"label\">")
        .text(label)
        .markup("</div><div class=\"value\">")
        .text(value)
        .markup("</div></div>");
}

fn legend(out: &mut Html, labels: &[String]) {
    out.markup("<div class=\"legend\">");
    for (i, l) in labels.iter().enumerate() {
        out.markup("<span style=\"background:")
            .markup(svg::PALETTE[i % svg::PALETTE.len()])
            .markup("\"></span>")
            .text(l);
    }
    out.markup("</div>");
}

/// The whole page for `actor`.
pub fn render_page(state: &NodeState, actor: &str) -> String {
    let history = state.metrics.history();
    let raft = state.consensus.metrics();
    let config = state.config();
    let refresh = refresh_secs(state);
    let mut out = Html::new();
    out.markup("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"")
        .text(refresh)
        .markup("\"><title>Tollgate node ")
        .text(state.node_id)
        .markup(" · dashboard</title><style>")
        .markup(STYLE)
        .markup("</style></head><body><header><h1>Tollgate · node ")
        .text(state.node_id)
        .markup(" (")
        .text(&state.region)
        .markup(")</h1><p>leader ")
        .text(raft.leader.map_or("none".to_string(), |l| l.to_string()))
        .markup(" · term ")
        .text(raft.term)
        .markup(" · policy version ")
        .text(config.version)
        .markup(" · ")
        .text(config.licenses.len())
        .markup(" licenses · sampled ")
        .text(if history.latest_at_ms > 0 {
            time_of_day(history.latest_at_ms as f64) + " UTC"
        } else {
            "not yet".to_string()
        })
        .markup(" · signed in as ")
        .text(actor)
        .markup("</p></header><main>");

    summary(state, &mut out);
    utilization(&history, &mut out);
    decisions_over_time(&history, &mut out);
    let reasons = state.metrics.reason_totals();
    blocked(&reasons, &mut out);
    dataset_violations(&reasons, &mut out);
    cluster_health(state, &mut out);
    let sections = state.dashboard.sections.read().clone();
    for s in sections {
        out.markup("<section class=\"extension\"><h2>")
            .text(s.title())
            .markup("</h2>");
        s.render(state, &mut out);
        out.markup("</section>");
    }
    out.markup("</main><footer>Refreshes every ")
        .text(refresh)
        .markup(" s. Figures are this node's own view; counters run since it started.</footer></body></html>");
    out.finish()
}

fn summary(state: &NodeState, out: &mut Html) {
    let t = state.metrics.check_totals();
    let latency = state.metrics.latency.snapshot();
    out.markup("<section class=\"wide\" id=\"summary\"><h2>Decisions</h2><div class=\"tiles\">");
    tile(out, "checks-allowed", "Checks allowed", t.allow);
    tile(out, "checks-denied", "Checks denied", t.deny);
    tile(out, "checks-throttled", "Checks throttled", t.throttle);
    tile(
        out,
        "requests-invalid",
        "Invalid requests",
        state
            .stats
            .n_invalid
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    tile(
        out,
        "check-p50",
        "Check p50 (last minute)",
        seconds(latency.quantiles[0]),
    );
    tile(
        out,
        "check-p99",
        "Check p99 (last minute)",
        seconds(latency.quantiles[2]),
    );
    out.markup("</div></section>");
}

fn utilization(history: &History, out: &mut Html) {
    out.markup("<section class=\"wide\" id=\"utilization\"><h2>License utilisation over time</h2>");
    // Busiest license first, by its most used quota now.
    let mut licenses: Vec<(&str, f64)> = Vec::new();
    for u in &history.latest {
        match licenses.iter_mut().find(|(l, _)| *l == u.license) {
            Some((_, r)) => *r = r.max(u.ratio()),
            None => licenses.push((&u.license, u.ratio())),
        }
    }
    licenses.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    if licenses.is_empty() {
        out.markup("<p class=\"muted\">No licenses with quotas or seats yet.</p>");
    }
    out.markup("<div class=\"licenses\">");
    for (license, _) in licenses.iter().take(MAX_LICENSE_CHARTS) {
        let series: Vec<(&(String, String), &crate::metrics::history::QuotaSeries)> = history
            .quotas
            .iter()
            .filter(|((l, _), _)| l == license)
            .collect();
        out.markup("<figure class=\"license\" data-license=\"")
            .text(license)
            .markup("\"><figcaption>")
            .text(license)
            .markup("</figcaption>");
        let lines: Vec<Series> = series
            .iter()
            .map(|((_, q), s)| Series {
                label: format!("{q} ({})", s.metric),
                points: s
                    .points
                    .iter()
                    .map(|p| (p.at_ms as f64, p.ratio()))
                    .collect(),
            })
            .collect();
        let title = format!("Utilisation of {license} per quota");
        svg::line_chart(
            out,
            &Axes {
                title: &title,
                y_max: 1.0,
                y_label: &percent,
                x_label: &time_of_day,
                rule: Some(1.0),
            },
            &lines,
        );
        legend(
            out,
            &lines.iter().map(|l| l.label.clone()).collect::<Vec<_>>(),
        );
        out.markup("<table><tr><th>quota</th><th class=\"n\">used</th><th class=\"n\">limit</th><th class=\"n\">used %</th></tr>");
        for u in history.latest.iter().filter(|u| u.license == *license) {
            out.markup("<tr data-quota=\"")
                .text(&u.quota)
                .markup("\">")
                .element("td", &u.quota)
                .element("td class=\"n\"", u.used)
                .element("td class=\"n\"", u.limit)
                .element("td class=\"n\"", percent(u.ratio()))
                .markup("</tr>");
        }
        out.markup("</table></figure>");
    }
    out.markup("</div>");
    if licenses.len() > MAX_LICENSE_CHARTS {
        out.markup("<p class=\"muted\">")
            .text(licenses.len() - MAX_LICENSE_CHARTS)
            .markup(" more licenses not shown (the busiest are first).</p>");
    }
    if history.n_untracked > 0 {
        out.markup("<p class=\"muted\">")
            .text(history.n_untracked)
            .markup(" quotas have no history: the history keeps a bounded number of series.</p>");
    }
    out.markup("</section>");
}

fn decisions_over_time(history: &History, out: &mut Html) {
    out.markup("<section id=\"decision-rates\"><h2>Checks per sample interval</h2>");
    let points: Vec<_> = history.decisions.iter().collect();
    if points.len() < 2 {
        out.markup("<p class=\"muted\">Collecting samples…</p></section>");
        return;
    }
    let delta = |f: fn(&crate::metrics::history::DecisionPoint) -> u64| {
        points
            .windows(2)
            .map(|w| (w[1].at_ms as f64, f(w[1]).saturating_sub(f(w[0])) as f64))
            .collect::<Vec<_>>()
    };
    let lines = vec![
        Series {
            label: "allowed".into(),
            points: delta(|p| p.allow),
        },
        Series {
            label: "denied".into(),
            points: delta(|p| p.deny),
        },
        Series {
            label: "throttled".into(),
            points: delta(|p| p.throttle),
        },
    ];
    // A top that is a multiple of the four grid steps keeps the ticks whole.
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    svg::line_chart(
        out,
        &Axes {
            title: "Checks allowed, denied and throttled per sample interval",
            y_max: (top / 4.0).ceil() * 4.0,
            y_label: &|y| format!("{y:.0}"),
            x_label: &time_of_day,
            rule: None,
        },
        &lines,
    );
    legend(
        out,
        &lines.iter().map(|l| l.label.clone()).collect::<Vec<_>>(),
    );
    out.markup("</section>");
}

fn reason_table(out: &mut Html, class: &str, title: &str, rows: &[(String, u64)]) {
    svg::bar_chart(out, title, class, rows);
    out.markup("<table><tr><th>reason</th><th class=\"n\">decisions</th></tr>");
    for (reason, n) in rows {
        out.markup("<tr data-reason=\"")
            .text(reason)
            .markup("\">")
            .element("td", reason)
            .element("td class=\"n\"", n)
            .markup("</tr>");
    }
    out.markup("</table>");
}

fn sorted_rows(reasons: &[(ReasonCode, u64)], keep: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = reasons
        .iter()
        .filter(|(c, _)| keep(c.as_str()))
        .map(|(c, n)| (c.as_str().to_string(), *n))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    rows
}

fn is_dataset_reason(code: &str) -> bool {
    DATASET_REASON_PREFIXES.iter().any(|p| code.starts_with(p))
}

fn blocked(reasons: &[(ReasonCode, u64)], out: &mut Html) {
    out.markup("<section id=\"blocked\"><h2>Blocked attempts by reason</h2>");
    let rows = sorted_rows(reasons, |_| true);
    if rows.is_empty() {
        out.markup("<p class=\"muted\">No blocked attempts since this node started.</p>");
    } else {
        reason_table(
            out,
            "reasons",
            "Denied or throttled decisions by reason",
            &rows,
        );
    }
    out.markup("</section>");
}

fn dataset_violations(reasons: &[(ReasonCode, u64)], out: &mut Html) {
    out.markup("<section id=\"dataset-violations\"><h2>Dataset violations</h2>");
    let rows = sorted_rows(reasons, is_dataset_reason);
    if rows.is_empty() {
        out.markup(
            "<p class=\"muted\">No dataset or lineage violations since this node started.</p>",
        );
    } else {
        reason_table(
            out,
            "dataset-reasons",
            "Decisions blocked by dataset or lineage constraints, by reason",
            &rows,
        );
    }
    out.markup("</section>");
}

fn cluster_health(state: &NodeState, out: &mut Html) {
    let raft = state.consensus.metrics();
    let members = state.consensus.members();
    let gossip = state.gossip.get().map(|g| g.figures(state.now_ms()));
    out.markup("<section class=\"wide\" id=\"cluster\"><h2>Cluster health</h2><p>")
        .text(members.len())
        .markup(if members.len() == 1 {
            " member · leader "
        } else {
            " members · leader "
        })
        .text(raft.leader.map_or("none".to_string(), |l| l.to_string()))
        .markup(" · term ")
        .text(raft.term)
        .markup(" · applied index ")
        .text(raft.last_applied_index.unwrap_or(0))
        .markup(" · largest gossip lag ")
        .text(gossip.as_ref().map_or(0, |g| g.max_lag_ms()))
        .markup(" ms</p>");
    out.markup("<table><tr><th>node</th><th>region</th><th>role</th><th class=\"n\">gossip lag</th><th class=\"n\">last heard</th><th>link</th><th class=\"n\">bytes sent</th><th class=\"n\">bytes received</th></tr>");
    for m in &members {
        let role = if raft.leader == Some(m.id) {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        out.markup("<tr data-node=\"")
            .text(m.id)
            .markup("\">")
            .element("td", m.id)
            .element("td", &m.info.region)
            .element("td", role);
        if m.id == state.node_id {
            out.markup("<td class=\"n\">–</td><td class=\"n\">–</td><td>this node</td><td class=\"n\">–</td><td class=\"n\">–</td>");
        } else {
            let peer = gossip
                .as_ref()
                .and_then(|g| g.peers.iter().find(|p| p.id == m.id));
            let wire = gossip.as_ref().and_then(|g| g.wire_of(m.id));
            out.element(
                "td class=\"n\"",
                peer.map_or("–".to_string(), |p| format!("{} ms", p.lag_ms)),
            )
            .element(
                "td class=\"n\"",
                peer.and_then(|p| p.last_heard_ms_ago)
                    .map_or("never".to_string(), |ms| {
                        format!("{:.1} s ago", ms as f64 / 1000.0)
                    }),
            )
            .element(
                "td",
                if wire.is_some_and(|w| w.connected) {
                    "connected"
                } else {
                    "down"
                },
            )
            .element("td class=\"n\"", wire.map_or(0, |w| w.bytes_sent))
            .element("td class=\"n\"", wire.map_or(0, |w| w.bytes_received));
        }
        out.markup("</tr>");
    }
    out.markup("</table>");
    if let Some(g) = gossip.filter(|g| !g.peers.is_empty()) {
        let bars: Vec<(String, u64)> = g
            .peers
            .iter()
            .map(|p| (format!("node {}", p.id), p.lag_ms.max(0) as u64))
            .collect();
        out.markup("<h3>Gossip lag per peer (ms)</h3>");
        svg::bar_chart(
            out,
            "Gossip lag per peer in milliseconds",
            "gossip-lag",
            &bars,
        );
    }
    out.markup("</section>");
}

/// The page answered without a valid token or session: what to do, and a
/// sign-in form that posts the token (so it stays out of the URL).
pub fn sign_in_page(node_id: u64, message: &str) -> String {
    let mut out = Html::new();
    out.markup("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tollgate node ")
        .text(node_id)
        .markup(" · sign in</title><style>")
        .markup(STYLE)
        .markup("</style></head><body><header><h1>Tollgate · node ")
        .text(node_id)
        .markup("</h1><p>")
        .text(message)
        .markup("</p></header><main><section class=\"wide\"><h2>Sign in with a viewer token</h2>\
            <form method=\"post\" action=\"/dashboard/login\"><input type=\"password\" name=\"token\" autocomplete=\"off\" placeholder=\"viewer token\"> <button type=\"submit\">Open dashboard</button></form>\
            <p class=\"muted\">Any token with the viewer role or above works (<code>viewer.token</code> beside <code>cluster.json</code>). Scripts may send it as <code>Authorization: Bearer</code> instead.</p></section></main></body></html>");
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_are_bounded_and_keep_no_plain_id() {
        let d = Dashboard::default();
        let id = d.open_session("viewer", 1_000);
        assert_eq!(id.len(), 64);
        assert_eq!(d.session(&id, 2_000).as_deref(), Some("viewer"));
        assert_eq!(d.session(&id, 1_000 + SESSION_TTL_MS), None);
        assert_eq!(d.session("not-a-session", 2_000), None);
        for _ in 0..MAX_SESSIONS + 10 {
            d.open_session("viewer", 3_000);
        }
        assert!(d.sessions.lock().len() <= MAX_SESSIONS);
        let stored = format!("{:?}", d.sessions.lock().keys().collect::<Vec<_>>());
        assert!(!stored.contains(&id));
    }

    #[test]
    fn the_session_cookie_is_found_by_node() {
        let header = "a=1; tollgate_dashboard_2=abc; tollgate_dashboard_1=def";
        assert_eq!(session_from_cookies(1, header), Some("def"));
        assert_eq!(session_from_cookies(2, header), Some("abc"));
        assert_eq!(session_from_cookies(3, header), None);
        let c = session_cookie(1, "xyz");
        assert!(c.starts_with("tollgate_dashboard_1=xyz;"));
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
            assert!(c.contains(attr), "{c}");
        }
    }

    #[test]
    fn dataset_reasons_are_told_by_prefix() {
        assert!(is_dataset_reason("dataset_category_denied"));
        assert!(is_dataset_reason("lineage_required"));
        assert!(!is_dataset_reason("quota_exceeded"));
    }
}
