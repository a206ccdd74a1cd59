//! The load-test smoke run (`loadtest/smoke.sh`): every scenario, small N, a few seconds each,
//! against wsgate and the Socket.IO peer, so the load generator and the peer cannot rot.
//! Runs on the binaries this `cargo test --workspace` built; needs `redis-server`, `redis-cli`,
//! `strace`, node and npm.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The two runs take turns: each measures a node that the other's load would slow down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn every_scenario_runs_against_both_servers() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (loadtest, wsgate) = built_binaries();
    require(
        "the smoke run",
        &[
            ("redis-server", "apt-get install redis-server"),
            ("node", "apt-get install nodejs npm (Node.js 18 or newer)"),
            ("npm", "apt-get install npm"),
            ("redis-cli", "apt-get install redis-tools"),
            ("strace", "apt-get install strace"),
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/smoke.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("WSGATE_BIN", &wsgate)
        .env("LOADTEST_BIN", &loadtest)
        .output()
        .expect("run loadtest/smoke.sh");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "loadtest/smoke.sh failed:\n{text}");
    assert!(
        text.contains("every scenario ran against wsgate and the Socket.IO peer"),
        "{text}"
    );
}

/// `loadtest/instructions.sh` on the binary this `cargo test --workspace` built, tiny and short:
/// it must count some instructions per delivery. Needs valgrind and `redis-server`.
#[test]
fn instructions_per_delivery_are_counted() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (loadtest, wsgate) = built_binaries();
    require(
        "instructions.sh",
        &[
            ("valgrind", "apt-get install valgrind"),
            ("redis-server", "apt-get install redis-server"),
            ("curl", "apt-get install curl"),
        ],
    );
    let out_dir = std::env::temp_dir().join(format!("wsgate-instructions-{}", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/instructions.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["--connections", "100", "--rate", "200", "--seconds", "2"])
        .arg("--out")
        .arg(&out_dir)
        .arg(&wsgate)
        .env("LOADTEST_BIN", &loadtest)
        .env("BASE_PORT", "19450")
        .output()
        .expect("run loadtest/instructions.sh");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        out.status.success(),
        "loadtest/instructions.sh failed:\n{text}"
    );
    let per_delivery: Vec<u64> = summary
        .lines()
        .filter(|l| l.starts_with("| 1-"))
        .filter_map(|l| l.split('|').nth(2))
        .filter_map(|n| n.trim().replace(',', "").parse().ok())
        .collect();
    assert!(
        matches!(per_delivery[..], [n] if n > 0),
        "no instructions per delivery in the summary:\n{summary}\n{text}"
    );
}

/// The load generator and the wsgate binary that `cargo test --workspace` built next to it.
fn built_binaries() -> (PathBuf, PathBuf) {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_wsgate-loadtest"));
    let wsgate = loadtest.with_file_name("wsgate");
    assert!(
        wsgate.exists(),
        "the wsgate binary is not built next to the load generator ({}): run \
         `cargo test --workspace` (or `cargo build -p wsgate`) first",
        wsgate.display()
    );
    (loadtest, wsgate)
}

/// Fails with how to install whichever of `tools` (name, how to get it) is missing.
fn require(what: &str, tools: &[(&str, &str)]) {
    for (tool, how) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "`{tool}` is needed by {what}: {how}");
    }
}
