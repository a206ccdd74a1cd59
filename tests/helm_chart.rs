//! Runs the Helm chart checks (helm/check/check_chart.py) with the tools that
//! `bash helm/check/install.sh` installs: the Helm engine (helm-python-sdk),
//! kubernetes-validate and the prometheus-operator schemas. Missing tools fail the test
//! with the command that installs them; the test never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tools_dir(root: &Path) -> PathBuf {
    match std::env::var_os("WSGATE_TOOLS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root.join(".tools"),
    }
}

#[test]
fn helm_chart_lints_renders_and_validates() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tools = tools_dir(&root);
    let python = tools.join("venv").join("bin").join("python");
    let models = tools
        .join("node")
        .join("node_modules")
        .join("@kubernetes-models")
        .join("prometheus-operator");
    let how =
        "install them with `bash helm/check/install.sh` (needs python3 with venv, node and npm; \
               WSGATE_TOOLS_DIR selects the directory, default .tools)";
    assert!(
        python.is_file(),
        "chart check tools are missing: {} not found; {how}",
        python.display()
    );
    assert!(
        models.is_dir(),
        "chart check tools are missing: {} not found; {how}",
        models.display()
    );

    let output = Command::new(&python)
        .arg(root.join("helm/check/check_chart.py"))
        .current_dir(&root)
        .env("WSGATE_TOOLS_DIR", &tools)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {how}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if output.status.code() == Some(2) {
        panic!("chart check tools are incomplete: {}; {how}", stderr.trim());
    }
    assert!(
        output.status.success(),
        "helm/check/check_chart.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // The script ends with "N passed, 0 failed"; make sure it really checked something.
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed"))
        .unwrap_or_else(|| panic!("no summary line in the chart check output:\n{stdout}"));
    let passed: usize = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the summary line {summary:?}"));
    assert!(
        summary.ends_with(", 0 failed"),
        "chart checks failed: {summary}"
    );
    assert!(passed >= 50, "only {passed} chart checks ran: {summary}");
}
