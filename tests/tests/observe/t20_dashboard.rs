use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tollgate_tests::TestNode;

use crate::{WAIT, fast_sampling, known_workload};

/// Browsers looked for, in order, unless `TOLLGATE_CHROMIUM` names one.
const BROWSERS: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];

/// How long one headless browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

fn find_browser() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TOLLGATE_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in BROWSERS {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    anyhow::bail!(
        "the dashboard test needs a headless Chromium and found none on PATH ({}); install Debian's package with `apt-get install -y chromium` (.ci/run does this in CI) or set TOLLGATE_CHROMIUM to the browser's path",
        BROWSERS.join(", ")
    )
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR`, or the `target/` this
/// test binary was built in.
fn target_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/<test binary>
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no target dir above {}", exe.display()))
}

/// Runs the browser headless on `url` with `args`; returns its stdout.
async fn browse(
    browser: &Path,
    profile: &Path,
    args: &[String],
    url: &str,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--mute-audio",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .kill_on_drop(true)
    .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(BROWSER_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} did not finish in {BROWSER_TIMEOUT:?}",
                browser.display()
            )
        })??;
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        browser.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The number in the summary tile `key`.
fn tile(dom: &str, key: &str) -> Option<String> {
    let at = dom.find(&format!("data-metric=\"{key}\""))?;
    let rest = &dom[at..];
    let v = rest.find("class=\"value\">")? + "class=\"value\">".len();
    let end = rest[v..].find('<')?;
    Some(rest[v..v + end].to_string())
}

/// The cells of the table row whose `attr` is `value`, as text.
fn row(dom: &str, attr: &str, value: &str) -> Vec<String> {
    let Some(at) = dom.find(&format!("<tr {attr}=\"{value}\">")) else {
        return Vec::new();
    };
    let rest = &dom[at..];
    let end = rest.find("</tr>").unwrap_or(rest.len());
    rest[..end]
        .split("<td")
        .skip(1)
        .filter_map(|cell| {
            let start = cell.find('>')? + 1;
            let stop = cell.find("</td>")?;
            Some(cell[start..stop].to_string())
        })
        .collect()
}

/// The `<figure>` of `license` on the page.
fn license_figure<'a>(dom: &'a str, license: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-license=\"{license}\""))?;
    let rest = &dom[at..];
    Some(&rest[..rest.find("</figure>")?])
}

#[tokio::test]
async fn the_dashboard_renders_the_known_workload_in_headless_chromium() -> anyhow::Result<()> {
    let browser = find_browser()?;
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), fast_sampling).await?;
    known_workload(&n).await?;

    // Wait until the sampler has seen the workload, and one more sample
    // after it, so the charts have lines.
    let viewer = n.viewer_token.clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, page) = n.get_text("/dashboard", Some(&viewer)).await?;
        assert_eq!(status, 200, "{page}");
        let tiny = row(&page, "data-quota", "daily");
        let sampled = license_figure(&page, "demo-tiny")
            .is_some_and(|f| row(f, "data-quota", "daily").get(1).map(String::as_str) == Some("5"));
        if sampled && !page.contains("Collecting samples") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no sample of the workload: {tiny:?}\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The browser signs in with ?token=, is redirected to the bare URL
    // with a session cookie, and renders the page.
    let profile = tempfile::tempdir()?;
    let url = format!("{}/dashboard?token={viewer}", n.http);
    let dom = browse(&browser, profile.path(), &["--dump-dom".into()], &url).await?;
    assert!(dom.contains("signed in as viewer"), "{dom}");

    // The numbers of the known workload.
    assert_eq!(tile(&dom, "checks-allowed").as_deref(), Some("7"), "{dom}");
    assert_eq!(tile(&dom, "checks-denied").as_deref(), Some("4"));
    assert_eq!(tile(&dom, "checks-throttled").as_deref(), Some("0"));
    assert_eq!(tile(&dom, "requests-invalid").as_deref(), Some("1"));
    for (reason, count) in [
        ("unknown_key", "2"),
        ("quota_exceeded", "1"),
        ("model_version_not_allowed", "1"),
    ] {
        assert_eq!(
            row(&dom, "data-reason", reason),
            vec![reason.to_string(), count.to_string()],
            "{reason}"
        );
    }
    let tiny =
        license_figure(&dom, "demo-tiny").ok_or_else(|| anyhow::anyhow!("no demo-tiny chart"))?;
    assert_eq!(
        row(tiny, "data-quota", "daily"),
        vec!["daily", "5", "5", "100%"]
    );
    let demo = license_figure(&dom, "demo").ok_or_else(|| anyhow::anyhow!("no demo chart"))?;
    assert_eq!(row(demo, "data-quota", "daily")[1], "3");

    // The charts: a utilisation line per quota, bars per blocked reason,
    // the decision rates, and the cluster table.
    assert!(tiny.contains("<svg class=\"chart line-chart\""));
    assert!(tiny.contains("<polyline class=\"series\" data-series=\"daily (inferences)\""));
    let blocked = &dom[dom.find("id=\"blocked\"").unwrap_or(0)..];
    assert_eq!(
        blocked[..blocked.find("</section>").unwrap_or(0)]
            .matches("<rect class=\"bar\"")
            .count(),
        3
    );
    assert!(dom.contains("id=\"decision-rates\""));
    assert!(
        dom.contains("aria-label=\"Checks allowed, denied and throttled per sample interval\"")
    );
    assert!(dom.contains("No dataset or lineage violations"));
    assert_eq!(row(&dom, "data-node", "1")[..3], ["1", "local-a", "leader"]);
    assert!(dom.contains("http-equiv=\"refresh\""));
    assert!(
        !dom.contains(&viewer),
        "the token must not appear on the page"
    );

    // A screenshot for review.
    let shot = target_dir()?.join("dashboard.png");
    if let Some(parent) = shot.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&shot);
    browse(
        &browser,
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600".into(),
        ],
        &url,
    )
    .await?;
    let png = std::fs::read(&shot)?;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {}",
        shot.display()
    );
    assert!(
        png.len() > 20_000,
        "a suspiciously small screenshot ({} bytes)",
        png.len()
    );
    n.node.shutdown().await
}

#[tokio::test]
async fn the_dashboard_needs_a_viewer_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let page = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body = r.text().await?;
        anyhow::Ok((status, body))
    };

    // Nothing, a wrong token, a wrong cookie: 401 and a sign-in form, no data.
    for req in [
        no_redirects.get(format!("{}/dashboard", n.http)),
        no_redirects.get(format!("{}/dashboard?token=nope", n.http)),
        no_redirects
            .get(format!("{}/dashboard", n.http))
            .header("authorization", "Bearer nope"),
        no_redirects
            .get(format!("{}/dashboard", n.http))
            .header("cookie", "tollgate_dashboard_1=0123"),
    ] {
        let (status, body) = page(req.send().await?).await?;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("action=\"/dashboard/login\""), "{body}");
        assert!(!body.contains("Blocked attempts"), "{body}");
    }
    let (status, _) = n.post("/dashboard/login", "").await?;
    assert!(status == 400 || status == 415 || status == 422, "{status}");

    // A viewer token in the header opens the page.
    let viewer = n.viewer_token.clone();
    let (status, body) = n.get_text("/dashboard", Some(&viewer)).await?;
    assert_eq!(status, 200);
    assert!(body.contains("Blocked attempts"));

    // ?token= once: a session cookie and a redirect to the bare URL.
    let r = no_redirects
        .get(format!("{}/dashboard?token={viewer}", n.http))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/dashboard")
    );
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.contains(&viewer),
        "the cookie carries a session, not the token"
    );
    let session = cookie.split(';').next().unwrap_or_default().to_string();
    let (status, body) = page(
        no_redirects
            .get(format!("{}/dashboard", n.http))
            .header("cookie", session)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("signed in as viewer"));

    // The sign-in form does the same with the token in the body.
    let r = no_redirects
        .post(format!("{}/dashboard/login", n.http))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={viewer}"))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 303);
    assert!(r.headers().contains_key("set-cookie"));
    n.node.shutdown().await
}
