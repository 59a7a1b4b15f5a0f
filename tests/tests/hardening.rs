//! End-to-end tests of the enforcer against its own host's configuration and environment:
//! a peer certificate issued to another enforcer, and a hostile environment (`PATH`,
//! `XTABLES_LIBDIR`) around the system programs handshake mode runs.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use tessera_proxy::flow::{Mode, Verdict};
use tessera_tests::{API_PORT, EnforcerOptions, TestNet, tessera_bin};

const SECS_30: Duration = Duration::from_secs(30);

fn tessera(args: &[&str]) -> Output {
    Command::new(tessera_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> &Output {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A cluster CA in `dir/ca` and certificates for `names` (as an operator makes them).
fn issue(dir: &Path, names: &[&str]) {
    let ca = dir.join("ca");
    ok(&tessera(&["ca", "init", "--dir", ca.to_str().unwrap()]));
    for name in names {
        let ca = ca.to_str().unwrap();
        ok(&tessera(&[
            "ca",
            "issue",
            "--ca-dir",
            ca,
            "--name",
            name,
            "--out-dir",
            ca,
        ]));
    }
}

/// host-a's configuration with one peer, `name`, whose certificate is `ca/<cert>.pem`.
fn config_with_peer(dir: &Path, name: &str, cert: &str) -> std::path::PathBuf {
    let path = dir.join("host-a.toml");
    fs::write(
        &path,
        format!(
            "name = \"host-a\"\nmode = \"handshake\"\n\
             [tls]\nca = \"ca/ca.pem\"\ncert = \"ca/host-a.pem\"\nkey = \"ca/host-a.key\"\n\
             [flows]\napi = \"\"\nmap_db = \"map.redb\"\n\
             [[peer]]\nname = \"{name}\"\ntunnel = \"10.77.0.2:15008\"\nserves = [\"10.77.0.2/32\"]\ncert = \"ca/{cert}.pem\"\n"
        ),
    )
    .unwrap();
    path
}

/// Threat: a `[[peer]]` configured with another enforcer's certificate (a copy-paste
/// mistake, or a planted file) would make handshake mode accept that enforcer's tokens as
/// the named peer's. `tessera check` and `tessera run` refuse it, naming the files, the peer
/// and both names. (No root needed: loading the configuration fails before anything runs.)
#[test]
fn a_peer_certificate_issued_to_another_enforcer_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    issue(dir.path(), &["host-a", "host-b", "host-c"]);
    let good = config_with_peer(dir.path(), "host-b", "host-b");
    let out = tessera(&["check", good.to_str().unwrap()]);
    ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok (0 workloads, 1 peers)\n", good.display())
    );

    let bad = config_with_peer(dir.path(), "host-b", "host-c");
    let want = format!(
        "{}: peer[0] \"host-b\": cert: {} is issued to \"host-c\", not to the peer's name \"host-b\"",
        bad.display(),
        dir.path().join("ca/host-c.pem").display()
    );
    let out = tessera(&["check", bad.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "check accepted host-c's certificate as host-b's"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want), "{err}");
    // `tessera run` loads the same way: it stops at start-up with the same error, before
    // touching anything.
    let out = tessera(&["run", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want), "{err}");
}

/// A directory of impostors: `iptables`, `ip6tables` and `ss` that only leave a mark.
fn impostors(net: &TestNet) -> (std::path::PathBuf, std::path::PathBuf) {
    let bin = net.dir.join("hostile-bin");
    fs::create_dir_all(&bin).unwrap();
    let marker = net.dir.join("impostor-ran");
    for tool in ["iptables", "ip6tables", "ss"] {
        let path = bin.join(tool);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$0 $*\" >> {}\nexit 1\n",
                marker.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (bin, marker)
}

fn policy(ports: &str) -> String {
    format!(
        "rules:\n  - name: web-api\n    action: allow\n    from: [{{labels: [app=web]}}]\n    to: [{{labels: [app=api]}}]\n    ports: [{ports}]\n"
    )
}

/// Threat: whoever starts the daemon chooses its environment; with `iptables` and `ss`
/// looked up through `$PATH`, a directory of theirs first in it would run their programs
/// as root and leave the host without the rules (or the revocations) it believes in force;
/// `XTABLES_LIBDIR` would choose the libraries iptables loads. After: both enforcers start
/// with such an environment, the impostors never run, the rules are in force (connections
/// are proven in the handshake) and a revocation closes the live connection with the real
/// `ss` (no revocation failure counted).
#[test]
fn handshake_mode_never_runs_system_programs_from_path_or_with_the_callers_environment() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake: true,
        ..EnforcerOptions::default()
    };
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    for host in ["host-a", "host-b"] {
        net.write_policy(Some(net.host(host)), &policy("7000"))
            .unwrap();
    }
    let (bin, marker) = impostors(&net);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", path.as_str()),
        // No extension libraries there: an iptables that honoured it could not add a rule.
        ("XTABLES_LIBDIR", bin.to_str().unwrap()),
    ];
    for host in ["host-a", "host-b"] {
        net.start_enforcer_with_env(net.host(host), &env).unwrap();
    }
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();

    // The rules are in force: a client that proves nothing (not enrolled) is refused...
    let out = net
        .run_tool(
            net.host("host-a"),
            None,
            &["echo-many", "10.77.0.2", "7000", "1"],
            SECS_30,
        )
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(serde_json::Value::Null);
    assert_ne!(v["ok"], 1, "an unproven connection got through: {v}");
    let refused = net.wait_flows(net.host("host-b"), 1, |f| {
        f.mode == Mode::Handshake
            && f.verdict == Verdict::Denied
            && f.code.as_str() == "unauthenticated"
    });
    assert!(!refused.is_empty(), "{:#?}", net.flows(net.host("host-b")));
    // ... and the workload's connection, proven in its handshake, is let through.
    let log = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // host-b's reload revokes it: the real ss closes it, the application sees the reset.
    net.write_policy(Some(net.host("host-b")), "rules: []\n")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = fs::read_to_string(&log).unwrap_or_default();
        if out.contains("reset") || out.contains("eof") {
            assert!(out.contains("reset"), "closed, but not with a reset: {out}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked connection stayed open: {out}\n{}",
            net.enforcer_log(net.host("host-b"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let f = net
        .wait_flows(net.host("host-b"), 1, |f| {
            f.code.as_str() == "policy-reload"
        })
        .pop()
        .unwrap_or_else(|| panic!("no revocation record: {:#?}", net.flows(net.host("host-b"))));
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");
    assert_eq!(f.mode, Mode::Handshake);

    // The metrics say no revocation failed.
    let auth = format!("Authorization: Bearer {}", net.api_token().unwrap());
    let out = net
        .run(
            net.host("host-b"),
            None,
            "curl",
            &[
                "-sS",
                "-H",
                &auth,
                &format!("http://10.77.0.2:{API_PORT}/metrics"),
            ],
            SECS_30,
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tessera_revocation_failures_total 0"),
        "{text}"
    );

    // Stopping removes the rules, again with the real iptables.
    for host in ["host-a", "host-b"] {
        net.stop_enforcer(net.host(host), false).unwrap();
    }
    assert!(
        !marker.exists(),
        "an impostor ran: {}",
        fs::read_to_string(&marker).unwrap_or_default()
    );
    for host in ["host-a", "host-b"] {
        let log = net.enforcer_log(net.host(host));
        assert!(log.contains("enforcer ready"), "{log}");
    }
}
