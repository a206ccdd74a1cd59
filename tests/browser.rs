//! The `wsgate demo` page in a real browser: headless Chromium driven by Playwright
//! (tests/browser/demo.mjs) against the real binary on ephemeral ports. Log in, publish from the
//! form and see it rendered, chat between two users, and a foreign origin refused (counted as
//! rejected{reason="origin"}).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
}

/// Chromium, Node.js and the pinned playwright-core, or a failure that says how to install them.
fn require_tools() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_string());
    assert!(
        Path::new(&chromium).is_file(),
        "Chromium is missing at {chromium}. Install it with `apt-get update && apt-get install -y \
         chromium` (Debian), or set CHROMIUM to a Chromium binary."
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "Node.js is missing: install it with `apt-get install -y nodejs npm` (Debian)."
    );
    assert!(
        browser_dir()
            .join("node_modules/playwright-core/package.json")
            .is_file(),
        "playwright-core is not installed: run `npm ci` in tests/browser \
         (`cd tests/browser && npm ci`)."
    );
    chromium
}

#[tokio::test]
async fn demo_page_in_headless_chromium() {
    let chromium = require_tools();
    let (public, admin, backend) = (free_addr(), free_addr(), free_addr());
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "demo",
            "--listen",
            &public,
            "--admin-listen",
            &admin,
            "--backend-listen",
            &backend,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsgate demo");

    // The page's URL is the first thing the demo prints.
    let stdout = demo.stdout.take().expect("demo stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the demo prints within 10 s")
        .expect("read stdout")
        .expect("a first line");
    let page_url = format!("http://{backend}/");
    assert!(
        first.contains(&page_url),
        "first line names the page {page_url}: {first}"
    );
    // Keep draining the banner so the demo never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let metrics_url = format!("http://{admin}/metrics");
    eventually(
        Duration::from_secs(10),
        "the demo gateway is ready",
        || async {
            http()
                .get(format!("http://{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        },
    )
    .await;
    let origin_rejections = || async {
        let scrape = http()
            .get(&metrics_url)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics");
        metric(
            &scrape,
            r#"wsgate_connections_rejected_total{endpoint="notws",reason="origin"}"#,
        )
    };
    assert_eq!(origin_rejections().await, 0.0);

    let gateway_port = public.rsplit(':').next().expect("a port").to_string();
    let run = tokio::process::Command::new("node")
        .arg("demo.mjs")
        .current_dir(browser_dir())
        .env("DEMO_URL", &page_url)
        .env("GATEWAY_PORT", &gateway_port)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser run ends within 120 s")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    println!("browser run: {}", stdout.trim());

    assert!(
        origin_rejections().await >= 1.0,
        "the foreign origin's handshake is counted as rejected{{reason=\"origin\"}}"
    );
    // The page authenticated with its session cookie only: whoami, never Authenticate.
    let stats: serde_json::Value = http()
        .get(format!("http://{backend}/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON");
    assert_eq!(stats["authenticate"], 0, "no API key was used: {stats}");
    assert!(
        stats["whoami"].as_u64().unwrap_or(0) >= 2,
        "both users' sessions were resolved by whoami: {stats}"
    );
    let _ = demo.kill().await;
}
