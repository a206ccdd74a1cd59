//! The real binary: configuration errors, and SIGTERM on a running node.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn wsgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    // The environment must not leak into these checks.
    for (k, _) in std::env::vars() {
        if k.starts_with("WSGATE_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn config_errors_exit_64_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--listen", "nonsense"], "--listen"),
        (&["serve", "--backend-url", "ftp://x"], "--backend-url"),
        (&["serve", "--auth-ttl", "soon"], "--auth-ttl"),
        (&["serve", "--auth-ttl", "0s"], "--auth-ttl"),
        (&["serve", "--redis-url", "http://localhost"], "--redis-url"),
        (
            &["serve", "--redis-url", "redis://a:1,redis://b:1"],
            "--redis-url",
        ),
        (
            &["serve", "--redis-url", "redis://a:1,http://b:1"],
            "--redis-url",
        ),
        (&["serve", "--redis-mode", "cluster"], "--redis-mode"),
        (&["serve", "--redis-mode", "ring"], "--redis-mode"),
        (
            &[
                "serve",
                "--redis-mode",
                "sentinel",
                "--redis-url",
                "redis://a:26379",
            ],
            "--redis-sentinel-master",
        ),
        (
            &[
                "serve",
                "--redis-url",
                "redis://a:6379",
                "--redis-sentinel-master",
                "m",
            ],
            "--redis-sentinel-master",
        ),
        (&["serve", "--max-frame-size", "10"], "--max-frame-size"),
        (&["serve", "--max-topics", "0"], "--max-topics"),
        (
            &["serve", "--max-frames-per-second", "0"],
            "--max-frames-per-second",
        ),
        (&["serve", "--write-timeout", "0s"], "--write-timeout"),
        (
            &["serve", "--user-id-pointer", "user.id"],
            "--user-id-pointer",
        ),
        (&["serve", "--api-token", " "], "--api-token"),
        (&["serve", "--log-format", "xml"], "--log-format"),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:9",
                "--admin-listen",
                "127.0.0.1:9",
            ],
            "--admin-listen",
        ),
        (
            &["serve", "--history-ttl", "10s", "--resume-window", "30s"],
            "--resume-window",
        ),
        (&["serve", "--resume-window", "soon"], "--resume-window"),
        (&["serve", "--no-such-flag"], "--no-such-flag"),
    ];
    for (args, flag) in cases {
        let out = wsgate().args(*args).output().expect("run wsgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
        assert!(stderr.contains(flag), "{args:?}: names {flag}: {stderr}");
    }
    // The environment is read too.
    let out = wsgate()
        .arg("serve")
        .env("WSGATE_DRAIN_TIMEOUT", "forever")
        .output()
        .expect("run wsgate");
    assert_eq!(out.status.code(), Some(64));
    // A Redis password never appears in the error.
    let out = wsgate()
        .args(["serve", "--redis-url", "redis://:s3cret@"])
        .output()
        .expect("run wsgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_exits_0() {
    let backend = Backend::start().await;
    let mut node = Binary::serve(&backend, &["--drain-timeout", "2s"]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::subscribed(&node.notws("alice")).await);
    }
    let pid = node.child.id().expect("pid").to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "SIGTERM sent");
    eventually(
        Duration::from_secs(2),
        "readyz 503 during the drain",
        || async { node.readyz().await == 503 },
    )
    .await;
    for c in clients.iter_mut() {
        assert_eq!(c.close_code(Duration::from_secs(5)).await, Some(1012));
    }
    let status = tokio::time::timeout(Duration::from_secs(10), node.child.wait())
        .await
        .expect("exits within the drain window")
        .expect("exit status");
    assert_eq!(status.code(), Some(0));
}
