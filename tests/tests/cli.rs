//! The `tessera` command line, run as a user would (no root needed).
use std::process::Command;

use tessera_tests::tessera_bin;

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(tessera_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

const POLICY: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
    ports: [8080]
  - name: audit
    action: deny
    mode: observe
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";

#[test]
fn policy_check_prints_every_error_with_its_position_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - name: a\n    action: permit\n    from: [{labels: [\"tier in prod\"]}]\n    to: [{cidr: 10.1.2.3/99}]\n").unwrap();
    let out = tessera(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success(), "check must fail on a bad policy");
    let f = bad.display();
    let want = format!(
        "{f}:3:13: action must be allow or deny\n{f}:4:22: expected a set like (a, b), found \"prod\"\n{f}:5:17: \"10.1.2.3/99\" is not a network (like 10.0.0.0/8) or an address\nerror: {f}: 3 error(s)\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), want);

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, POLICY).unwrap();
    let out = tessera(&["policy", "check", good.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok (2 rules)\n", good.display())
    );
}

#[test]
fn policy_explain_names_the_deciding_rule_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(&p, POLICY).unwrap();
    let ps = p.to_str().unwrap();
    let out = tessera(&[
        "policy", "explain", "--policy", ps, "--from", "app=web", "--to", "app=api", "--port",
        "8080",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "decision: allow\nrule:     web-to-api ({ps}:2)\nobserve:  rule audit ({ps}:7) would deny (observe mode: recorded only)\nreason:   allowed by rule web-to-api\n"
        )
    );
    let out = tessera(&[
        "policy", "explain", "--policy", ps, "--from", "app=web", "--to", "app=api", "--port", "9",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("decision: deny\nrule:     none matched: default deny\n")
    );
    let out = tessera(&[
        "policy", "explain", "--policy", ps, "--from", "app", "--to", "app=api", "--port", "9",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--from: label \"app\" is not key=value")
    );
}

#[test]
fn config_check_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("host.toml");
    std::fs::write(
        &c,
        "name = \"h\"\n[tls]\nca = \"ca.pem\"\ncert = \"h.pem\"\nkey = \"h.key\"\n",
    )
    .unwrap();
    let out = tessera(&["check", c.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: tls.ca: cannot read", c.display())),
        "{err}"
    );
}
