//! The real binary: configuration errors, and SIGTERM on a running node.

mod common;

use std::process::{Command, Stdio};
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
        (&["serve", "--max-frame-size", "10"], "--max-frame-size"),
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

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_exits_0() {
    let backend = Backend::start().await;
    let (public, admin) = (free_addr(), free_addr());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "serve",
            "--listen",
            &public,
            "--admin-listen",
            &admin,
            "--backend-url",
            &backend.url(),
            "--drain-timeout",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsgate");
    let ready = format!("http://{admin}/readyz");
    eventually(Duration::from_secs(10), "node ready", || async {
        http()
            .get(&ready)
            .send()
            .await
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false)
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            Client::subscribed(&format!(
                "ws://{public}/notws?api_key=key-alice&userId=alice"
            ))
            .await,
        );
    }
    let pid = child.id().expect("pid") as i32;
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc_kill(pid, 15) };
    assert_eq!(rc, 0, "SIGTERM sent");
    eventually(
        Duration::from_secs(2),
        "readyz 503 during the drain",
        || async {
            http()
                .get(&ready)
                .send()
                .await
                .map(|r| r.status().as_u16() == 503)
                .unwrap_or(false)
        },
    )
    .await;
    for c in clients.iter_mut() {
        assert_eq!(c.close_code(Duration::from_secs(5)).await, Some(1012));
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the drain window")
        .expect("exit status");
    assert_eq!(status.code(), Some(0));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
