//! The load-test smoke run (`loadtest/smoke.sh`): every scenario, small N, a few seconds each,
//! against wsgate and the Socket.IO peer, so the load generator and the peer cannot rot.
//! Runs on the binaries this `cargo test --workspace` built; needs `redis-server`, `redis-cli`,
//! `strace`, node and npm.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_scenario_runs_against_both_servers() {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_wsgate-loadtest"));
    let wsgate = loadtest.with_file_name("wsgate");
    assert!(
        wsgate.exists(),
        "the wsgate binary is not built next to the load generator ({}): run \
         `cargo test --workspace` (or `cargo build -p wsgate`) first",
        wsgate.display()
    );
    for (tool, how) in [
        ("redis-server", "apt-get install redis-server"),
        ("node", "apt-get install nodejs npm (Node.js 18 or newer)"),
        ("npm", "apt-get install npm"),
        ("redis-cli", "apt-get install redis-tools"),
        ("strace", "apt-get install strace"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "`{tool}` is needed by the smoke run: {how}");
    }
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
