//! The README's configuration table must say what `wsgate serve --help` says.

use std::process::Command;

#[test]
fn readme_configuration_table_matches_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .expect("run wsgate serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut flags = 0;
    for block in help.split("\n      --").skip(1) {
        let flag = format!("--{}", block.split_whitespace().next().unwrap_or_default());
        if flag == "--help" {
            continue;
        }
        let text = block.split_whitespace().collect::<Vec<_>>().join(" ");
        let env = text
            .split("[env: ")
            .nth(1)
            .and_then(|s| s.split([']', '=']).next())
            .unwrap_or_else(|| panic!("{flag} has an environment variable"));
        let default = text
            .split("[default: ")
            .nth(1)
            .and_then(|s| s.split(']').next())
            .map(|d| format!("`{d}`"))
            .unwrap_or_else(|| "(none)".to_string());
        let row = format!("| `{flag}` | `{env}` | {default} |");
        assert!(
            readme.contains(&row),
            "README.md has no row starting with {row}"
        );
        flags += 1;
    }
    assert!(flags >= 25, "parsed {flags} flags from --help");
}
