//! The Moqui component (`deploy/moqui/wsgate-moqui`): its Groovy sources compile against stubs of
//! the Moqui API they call (`tests/moqui-stubs`, signatures as in moqui-framework), its XML files
//! are well-formed and name methods that exist, and the requests it makes are the ones a real
//! gateway accepts: a notification, a GrowERP chat push and a presence query reach real
//! WebSocket clients of an in-process node, the presence SECA marks exactly the online members,
//! the revocation EECA waits for the commit, and whoami answers `{"userId", "ownerPartyId"}`.
//!
//! Needs `groovyc` and `groovy` (Debian: `apt-get install groovy default-jre-headless`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const COMPONENT: &str = "deploy/moqui/wsgate-moqui";
const STUBS: &str = "tests/moqui-stubs";
const INSTALL: &str = "install groovy: apt-get install groovy default-jre-headless";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir` whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A Groovy tool from PATH, with JAVA_HOME set when the Debian launcher could not find a JVM
/// by itself (no default-java link); fails with the install command when missing.
fn groovy_tool(name: &str) -> Command {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    let Some(path) = found else {
        panic!("{name} not found on PATH: {INSTALL}");
    };
    let mut cmd = Command::new(path);
    if std::env::var_os("JAVA_HOME").is_none() && !Path::new("/usr/lib/jvm/default-java").exists() {
        let java = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("java"))
                .find(|p| p.is_file())
        });
        let home = java
            .and_then(|j| std::fs::canonicalize(j).ok())
            .and_then(|j| j.parent().and_then(Path::parent).map(Path::to_path_buf));
        match home {
            Some(h) => {
                cmd.env("JAVA_HOME", h);
            }
            None => panic!("no Java runtime found for {name}: {INSTALL}"),
        }
    }
    cmd
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("moqui-component-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// Compiles the stubs (Java) and the component (Groovy) together into `out`.
fn compile_component(out: &Path) {
    let root = root();
    let mut cmd = groovy_tool("groovyc");
    cmd.arg("-j").arg("-d").arg(out);
    cmd.args(files(&root.join(STUBS), ".java"));
    cmd.args(files(
        &root.join(COMPONENT).join("src/main/groovy"),
        ".groovy",
    ));
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("run groovyc: {e}: {INSTALL}"));
    assert!(
        output.status.success(),
        "the component does not compile against the Moqui API stubs:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn component_compiles_against_the_moqui_api() {
    let out = scratch("compile");
    compile_component(&out);
    let sources = files(&root().join(COMPONENT).join("src/main/groovy"), ".groovy");
    assert!(sources.len() >= 4, "component sources: {sources:?}");
    for source in sources {
        let class = source
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("source name");
        assert!(
            out.join("wsgate/moqui")
                .join(format!("{class}.class"))
                .is_file(),
            "{class}.class was not produced"
        );
    }
}

#[test]
fn component_xml_is_well_formed_and_names_real_methods() {
    let component = root().join(COMPONENT);
    let xml = files(&component, ".xml");
    assert!(xml.len() >= 6, "component XML files: {xml:?}");
    let output = Command::new("python3")
        .arg("-c")
        .arg("import sys, xml.dom.minidom\nfor f in sys.argv[1:]: xml.dom.minidom.parse(f)")
        .args(&xml)
        .output()
        .expect("run python3 (apt-get install python3)");
    assert!(
        output.status.success(),
        "malformed XML: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Every WsgateHooks method a service or ECA script calls is defined, as a static method.
    let hooks =
        std::fs::read_to_string(component.join("src/main/groovy/wsgate/moqui/WsgateHooks.groovy"))
            .expect("read WsgateHooks.groovy");
    let mut called = Vec::new();
    for file in &xml {
        let text = std::fs::read_to_string(file).expect("read XML");
        for (i, _) in text.match_indices("wsgate.moqui.WsgateHooks.") {
            let rest = &text[i + "wsgate.moqui.WsgateHooks.".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            called.push(name);
        }
    }
    for name in [
        "whoAmI",
        "pushChatMessage",
        "refreshChatPresence",
        "revokeUser",
    ] {
        assert!(called.iter().any(|c| c == name), "no XML calls {name}");
    }
    for name in &called {
        let signature = format!(" {name}(ExecutionContext ec");
        assert!(
            hooks
                .lines()
                .any(|l| l.contains(&signature) && l.trim_start().starts_with("static ")),
            "XML calls WsgateHooks.{name}, which WsgateHooks.groovy does not define as static"
        );
    }

    // The REST resource, the SECAs and the EECAs are where Moqui looks for them.
    for path in [
        "service/wsgate.rest.xml",
        "service/wsgate/WsgateServices.xml",
        "service/WsgateChat.secas.xml",
        "entity/WsgateRevocation.eecas.xml",
        "data/WsgateSecurityData.xml",
    ] {
        assert!(component.join(path).is_file(), "{path} is missing");
    }
}

/// What the revocation endpoint answered the component: 202 is the contract.
fn check_revocation_answer(status: &str) {
    assert_eq!(status, "202", "POST /api/v1/revocations answered {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_requests_are_accepted_by_a_real_gateway() {
    let out = scratch("requests");
    compile_component(&out);

    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut alice_notws = Client::subscribed(&node.notws("alice")).await;
    let mut alice_chat = Client::connect(&node.chat("alice")).await;
    let mut bob_chat = Client::connect(&node.chat("bob")).await;
    let mut carol_chat = Client::connect(&node.chat("carol")).await;

    let mut cmd = groovy_tool("groovy");
    cmd.arg("-cp")
        .arg(&out)
        .arg(root().join(STUBS).join("client_check.groovy"))
        .env("WSGATE_ADMIN_URL", node.admin_url(""))
        .env("WSGATE_API_TOKEN", TOKEN)
        .env("WSGATE_TIMEOUT_MS", "5000")
        .env("WSGATE_CHECK_PRESENCE", "alice,bob,dave");
    let output = tokio::process::Command::from(cmd)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run groovy: {e}: {INSTALL}"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "client_check.groovy failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains(TOKEN),
        "the component logged the API token:\n{stderr}"
    );
    eprintln!("client_check.groovy:\n{stdout}{stderr}");
    let results: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    let result = |k: &str| -> &str {
        results
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no '{k}' line in:\n{stdout}\n{stderr}"))
    };

    // Notification: accepted, and delivered twice (direct publish, then the listener), byte for
    // byte with Moqui's JSON: sentDate is a string.
    assert_eq!(result("notify"), "202");
    for _ in 0..2 {
        let frame = alice_notws.recv_json().await;
        assert_eq!(frame["topic"], "SalesOrder");
        assert_eq!(frame["notificationMessageId"], "100234");
        assert_eq!(frame["sentDate"], "2025-11-29T00:00:00+0000");
    }

    // Chat: the SECA's push reaches the room's other members, not the sender.
    assert_eq!(result("chat"), "202");
    let expected = json!({
        "chatRoom": {"chatRoomId": "room1"},
        "chatMessageId": "CM100",
        "fromUserId": "alice",
        "fromUserFullName": "alice@example.com",
        "content": "Order shipped",
        "creationDate": "2025-11-29 00:00"
    });
    assert_eq!(bob_chat.recv_json().await, expected);
    assert_eq!(carol_chat.recv_json().await, expected);
    alice_chat.expect_silence(Duration::from_millis(300)).await;

    // Presence: the answer shape the component reads, and the sweep's SECA marks exactly the
    // unread members with an open socket (bob and carol; dave has none).
    let presence: Value = serde_json::from_str(result("presence")).expect("presence JSON");
    assert_eq!(presence, json!({"alice": true, "bob": true, "dave": false}));
    assert_eq!(result("marked"), "bob,carol");

    // Revocation: deferred to the commit in one synchronization per transaction, each user once.
    assert_eq!(result("revoke-deferred"), "wsgate.revokeUsers alice,bob");
    check_revocation_answer(result("revoke"));

    // whoami: the shape the gateway's default session pointers read (/userId, /ownerPartyId).
    let whoami: Value = serde_json::from_str(result("whoami")).expect("whoami JSON");
    assert_eq!(whoami.pointer("/userId"), Some(&json!("alice")));
    assert_eq!(whoami.pointer("/ownerPartyId"), Some(&json!("ACME")));
    let plain: Value = serde_json::from_str(result("whoami-no-party")).expect("whoami JSON");
    assert_eq!(plain, json!({"userId": "alice"}), "no tenant: omitted");

    node.stop().await;
}
