//! The host install end to end (issue 15, item 1): the Debian package `cargo xtask package`
//! builds is installed with dpkg into a clean root, its systemd units pass
//! `systemd-analyze verify`, and the binary it installed — run as its units run it (their
//! flags, their signal, within their capability bounding sets) — serves a control plane, an
//! enforcer enrols with a join token and enforces (an allowed and a denied connection, both
//! recorded), capture stays in force (refused, never bypassed) across a restart and a
//! package upgrade, and `tessera detach` takes it off.
//!
//! The package is `$TESSERA_DEB` (what `cargo xtask test` builds first), else the newest
//! `target/debian/*.deb`, else it is built here with `cargo xtask package`.
//!
//! Why `dpkg --root --force-script-chrootless`: a clean root (an empty directory with an
//! empty dpkg database) has no shell for dpkg to run the maintainer scripts in a chroot;
//! chrootless, they run on this host with `DPKG_ROOT` set, which is how Debian bootstraps
//! a root, and the scripts must honour it (the system user lands in the root's
//! /etc/passwd, never this host's). `--force-depends`: the clean root has no libc6 package
//! (the binary runs on this host's libc, which the Depends names).
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use tessera_proxy::flow::{Direction, Verdict};
use tessera_tests::{ControlServer, TestNet, eventually};

const T: Duration = Duration::from_secs(30);

const WEB_TO_API: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The package under test (see the module doc).
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_DEB") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TESSERA_DEB={} is not a file", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let newest = |dir: &Path| {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
    };
    if let Some(p) = newest(&target.join("debian")) {
        return p;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["xtask", "package"])
        .current_dir(workspace()));
    newest(&target.join("debian")).expect("cargo xtask package made no .deb")
}

/// A clean root: nothing but an empty dpkg database. Removed on drop.
struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tessera-root-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
            fs::write(dir.join(f), "").unwrap();
        }
        Root(dir)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }

    fn dpkg(&self, args: &[&str]) -> Output {
        run(Command::new("dpkg")
            .arg(format!("--root={}", self.0.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args))
    }

    fn install(&self, deb: &Path) -> Output {
        self.dpkg(&["-i", deb.to_str().unwrap()])
    }

    /// `dpkg -s tessera` in this root.
    fn status(&self) -> String {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", self.0.display()))
            .args(["-s", "tessera"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn unit(&self, name: &str) -> Unit {
        Unit(fs::read_to_string(self.path(&format!("lib/systemd/system/{name}"))).unwrap())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A unit file, read as systemd reads its keys.
struct Unit(String);

impl Unit {
    /// Every value of `key` (in order).
    fn values(&self, key: &str) -> Vec<String> {
        self.0
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    }

    fn value(&self, key: &str) -> String {
        let v = self.values(key);
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        v[0].clone()
    }

    /// `CapabilityBoundingSet=` as setpriv's `--bounding-set` (`-all,+bpf,...`).
    fn bounding_set(&self) -> String {
        let caps = self.value("CapabilityBoundingSet");
        let mut set = vec!["-all".to_string()];
        set.extend(caps.split_whitespace().map(|c| {
            format!(
                "+{}",
                c.strip_prefix("CAP_").expect("CAP_ name").to_lowercase()
            )
        }));
        set.join(",")
    }
}

/// The capability mask of a unit's `CapabilityBoundingSet=` (linux/capability.h numbers).
fn cap_mask(unit: &Unit) -> u64 {
    unit.value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| match c {
            "CAP_DAC_READ_SEARCH" => 2,
            "CAP_NET_ADMIN" => 12,
            "CAP_NET_RAW" => 13,
            "CAP_SYS_PTRACE" => 19,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("{other}: add its number"),
        })
        .fold(0, |m, n| m | 1u64 << n)
}

/// A process's effective and bounding capability sets (from /proc/<pid>/status).
fn caps_of(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    (field("CapEff:"), field("CapBnd:"))
}

/// A wrapper that runs the installed binary as `unit` runs it: within its capability
/// bounding set (all root keeps) and with no new privileges.
fn as_unit(root: &Root, unit: &Unit, name: &str, dir: &Path) -> PathBuf {
    assert_eq!(unit.values("NoNewPrivileges"), ["yes"], "{name}");
    let wrapper = dir.join(format!("{name}.sh"));
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all --bounding-set={} {} \"$@\"\n",
            unit.bounding_set(),
            root.path("usr/bin/tessera").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// The package with its version raised (`+upgrade`): the same files, as a newer release.
fn newer(deb: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("newer");
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap()
        .to_owned();
    fs::write(
        &control,
        text.replace(
            &format!("Version: {version}"),
            &format!("Version: {version}+upgrade"),
        ),
    )
    .unwrap();
    let out = dir.join("tessera-newer.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&tree)
        .arg(&out));
    out
}

fn host_passwd() -> String {
    fs::read_to_string("/etc/passwd").unwrap_or_default()
}

#[test]
fn the_package_installs_into_a_clean_root_and_its_units_verify() {
    tessera_tests::require_root().unwrap();
    let deb = deb();
    let root = Root::new("install");
    let passwd_before = host_passwd();
    root.install(&deb);

    let status = root.status();
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("libc6 (>= "),
        "Depends names libc: {status}"
    );
    for conffile in ["/etc/tessera/enforcer.toml", "/etc/tessera/server.env"] {
        assert!(
            status.contains(&format!(" {conffile} ")),
            "{conffile} is a conffile: {status}"
        );
    }
    let bin = root.path("usr/bin/tessera");
    assert_eq!(
        fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // postinst made the server's user in the root, and left this host's users alone.
    let passwd = fs::read_to_string(root.path("etc/passwd")).unwrap_or_default();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("tessera:") && l.contains(":/var/lib/tessera/server:")),
        "root's /etc/passwd: {passwd}"
    );
    assert_eq!(host_passwd(), passwd_before, "the host's users untouched");

    // The units pass systemd's own checks (the binary they name is the root's). The clean
    // root has no systemd package: its targets and slices, which the units order against,
    // come from this host's systemd, as they would from the root's own.
    let systemd_units = root.path("usr/lib/systemd/system");
    fs::create_dir_all(&systemd_units).unwrap();
    for e in fs::read_dir("/lib/systemd/system")
        .expect("systemd's units")
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "target" || x == "slice") {
            run(Command::new("cp").arg("-a").arg(&p).arg(&systemd_units));
        }
    }
    for unit in ["tessera-enforcer.service", "tessera-server.service"] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.0.display()))
            .arg(format!("/lib/systemd/system/{unit}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{unit}: {stderr}");
        assert!(stderr.trim().is_empty(), "{unit}: {stderr}");
    }
    let enforcer = root.unit("tessera-enforcer.service");
    let exec = enforcer.value("ExecStart");
    assert!(
        exec.contains(" run ") && exec.contains("--keep-attached"),
        "capture kept across restarts: {exec}"
    );
    assert!(enforcer.value("Restart") == "always" || enforcer.value("Restart") == "on-failure");
    let server = root.unit("tessera-server.service");
    assert_eq!(server.value("CapabilityBoundingSet"), "", "no capability");
    assert_eq!(server.value("User"), "tessera");

    // The default configuration is the current format (only its files are missing).
    let toml = fs::read_to_string(root.path("etc/tessera/enforcer.toml")).unwrap();
    let config: tessera_enforcer::config::Config = toml::from_str(&toml).expect("enforcer.toml");
    assert!(config.control.is_some(), "enrols with a control plane");
    let checked = run(Command::new(&bin)
        .arg("check")
        .arg(root.path("etc/tessera/enforcer.toml")));
    assert!(String::from_utf8_lossy(&checked.stdout).contains(": ok"));

    // Manual pages for the commands, and help that says where things are.
    for page in [
        "tessera.1.gz",
        "tessera-run.1.gz",
        "tessera-server-run.1.gz",
    ] {
        let p = root.path(&format!("usr/share/man/man1/{page}"));
        assert!(p.is_file(), "{}", p.display());
    }
    let page = run(Command::new("zcat").arg(root.path("usr/share/man/man1/tessera-run.1.gz")));
    assert!(String::from_utf8_lossy(&page.stdout).contains("keep\\-attached"));
    let help = run(Command::new(&bin).arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    for what in [
        "/etc/tessera/enforcer.toml",
        "/var/lib/tessera",
        "Examples:",
    ] {
        assert!(help.contains(what), "--help tells {what}: {help}");
    }
    assert!(root.path("usr/share/doc/tessera/install-host.md").is_file());

    // An upgrade keeps the configuration and the user; removal keeps the configuration;
    // purge takes configuration and state.
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        root.path("etc/tessera/enforcer.toml"),
        format!("{toml}\n# edited\n"),
    )
    .unwrap();
    root.install(&newer(&deb, dir.path()));
    let status = root.status();
    assert!(status.contains("+upgrade"), "{status}");
    assert!(
        fs::read_to_string(root.path("etc/tessera/enforcer.toml"))
            .unwrap()
            .ends_with("# edited\n"),
        "an edited conffile survives the upgrade"
    );
    root.dpkg(&["-r", "tessera"]);
    assert!(!bin.exists());
    assert!(root.path("etc/tessera/enforcer.toml").exists());
    fs::create_dir_all(root.path("var/lib/tessera/server")).unwrap();
    root.dpkg(&["--purge", "tessera"]);
    assert!(!root.path("etc/tessera/enforcer.toml").exists());
    assert!(!root.path("var/lib/tessera").exists());
}

fn echo_ok(net: &TestNet) -> bool {
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    v["ok"] == 1
}

/// curl from web@host-a to the plain web server on `control` (a host without an
/// enforcer, reached directly unless capture intervenes); its exit code.
fn web_to_outside(net: &TestNet) -> Option<i32> {
    net.run(
        net.host("host-a"),
        Some("web"),
        "curl",
        &["-sS", "-m", "5", "http://10.77.0.3:8080/"],
        T,
    )
    .unwrap()
    .status
    .code()
}

fn pinned_links(dir: &Path) -> usize {
    fs::read_dir(dir.join("links"))
        .map(|gens| {
            gens.flatten()
                .map(|g| fs::read_dir(g.path()).map(|l| l.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn the_installed_binary_enrols_enforces_and_keeps_capture_across_a_restart_and_an_upgrade() {
    installed_enforcer(false);
}

/// The same in handshake mode: netfilter rules and NFQUEUE within the unit's capabilities.
#[test]
fn the_installed_binary_in_handshake_mode_keeps_its_rules_across_a_restart() {
    installed_enforcer(true);
}

/// The installed server and enforcers (tunnel or handshake mode) as their units run them.
fn installed_enforcer(handshake: bool) {
    tessera_tests::require_root().unwrap();
    let deb = deb();
    let root = Root::new(if handshake { "handshake" } else { "tunnel" });
    root.install(&deb);
    let enforcer_unit = root.unit("tessera-enforcer.service");
    let server_unit = root.unit("tessera-server.service");

    let mut net =
        TestNet::with_plain_hosts(&["host-a", "host-b"], &["control"]).expect("test hosts");
    let server_bin = as_unit(&root, &server_unit, "server", &net.dir);
    let enforcer_bin = as_unit(&root, &enforcer_unit, "enforcer", &net.dir);
    // The enforcer runs with the unit's flags: --keep-attached (the config and the
    // ready file are the test's).
    let exec = enforcer_unit.value("ExecStart");
    net.options.lock().unwrap().keep_attached =
        exec.split_whitespace().any(|a| a == "--keep-attached");
    assert!(net.options.lock().unwrap().keep_attached, "{exec}");
    assert_eq!(enforcer_unit.value("KillSignal"), "SIGTERM");
    net.options.lock().unwrap().handshake = handshake;

    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    net.set_bin(server_bin);
    let srv: ControlServer = net
        .start_control(net.host("control"), &[])
        .expect("the installed server, without any capability");
    net.set_bin(enforcer_bin.clone());
    net.join(net.host("host-a"), &srv, "site=paris").unwrap();
    net.join(net.host("host-b"), &srv, "site=london").unwrap();
    net.start_enforcers()
        .expect("the installed enforcer, within the unit's capabilities");
    // They run the installed binary with exactly their units' capabilities.
    let a_pid = net.enforcer_pid(net.host("host-a")).unwrap();
    assert_eq!(
        fs::read_link(format!("/proc/{a_pid}/exe")).unwrap(),
        root.path("usr/bin/tessera")
    );
    let mask = cap_mask(&enforcer_unit);
    assert_eq!(caps_of(a_pid), (mask, mask), "enforcer: {mask:x}");
    assert_eq!(caps_of(srv.pid), (0, 0), "server: no capability");
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    let www = net.dir.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "outside\n").unwrap();
    net.serve_http(net.host("control"), None, "0.0.0.0", 8080, &www)
        .unwrap();
    let policy = net.dir.join("central.yaml");
    fs::write(&policy, WEB_TO_API).unwrap();
    net.control_admin(&srv, &["policy", "apply", policy.to_str().unwrap()])
        .unwrap();

    // Enrolled and enforcing: web -> api allowed by the central policy, web -> outside denied.
    assert!(
        eventually(Duration::from_secs(15), || echo_ok(&net)),
        "web@host-a -> api@host-b under the central policy\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let code = web_to_outside(&net);
    assert_ne!(code, Some(0), "web -> outside: no rule allows it");
    let a = net.host("host-a");
    let allowed = net.wait_flows(net.host("host-b"), 1, |f| {
        f.direction == Direction::Inbound
            && f.verdict == Verdict::Allowed
            && f.rule.as_deref() == Some("web-to-api")
    });
    assert!(!allowed.is_empty(), "{:?}", net.flows(net.host("host-b")));
    assert_eq!(
        allowed[0].src.labels.get("site").map(String::as_str),
        Some("paris")
    );
    let denied = net.wait_flows(a, 1, |f| {
        f.verdict == Verdict::Denied && f.dst.addr.ip().to_string() == "10.77.0.3"
    });
    assert!(!denied.is_empty(), "{:?}", net.flows(a));
    let status = net
        .control_admin(&srv, &["server", "status", "--json"])
        .unwrap();
    assert!(
        status.contains("\"host-a\"") && status.contains("active"),
        "{status}"
    );

    // detach refuses while the enforcer runs (in its namespace, where it listens).
    let config = net.config_path(a);
    let busy_in_ns = net
        .run(
            a,
            None,
            enforcer_bin.to_str().unwrap(),
            &["detach", "--config", config.to_str().unwrap()],
            T,
        )
        .unwrap();
    assert!(
        !busy_in_ns.status.success()
            && String::from_utf8_lossy(&busy_in_ns.stderr).contains("stop the enforcer first"),
        "detach while the enforcer runs: {busy_in_ns:?}"
    );
    assert!(pinned_links(&net.pin_dir(a)) > 0);

    for step in ["restart", "upgrade"] {
        // Stopped as the unit stops it (SIGTERM, --keep-attached): capture stays.
        net.stop_enforcer(a, false).unwrap();
        assert!(
            net.enforcer_log(a).contains("leaving capture attached"),
            "{step}: {}",
            net.enforcer_log(a)
        );
        assert!(pinned_links(&net.pin_dir(a)) > 0, "{step}: links pinned");
        // Refused, not let through: the outside host has no enforcer, so only capture can
        // refuse it (tunnel mode: at connect, curl 7; handshake mode: the queued SYNs are
        // dropped); and api is not reached either.
        let down = web_to_outside(&net);
        if handshake {
            assert_ne!(down, Some(0), "{step}: outside, while down");
        } else {
            assert_eq!(down, Some(7), "{step}: outside, while down");
        }
        assert!(!echo_ok(&net), "{step}: api, while down");
        if step == "upgrade" {
            // The package upgraded under the stopped enforcer (what postinst's
            // try-restart does on a host: stop, then start on the new binary).
            root.install(&newer(&deb, &net.dir));
            assert!(root.status().contains("+upgrade"));
        }
        net.start_enforcer(a).unwrap();
        assert!(
            eventually(Duration::from_secs(15), || echo_ok(&net)),
            "{step}: web -> api again\n{}",
            net.enforcer_log(a)
        );
        assert_ne!(web_to_outside(&net), Some(0), "{step}: still denied");
    }

    // Capture off the host for good: stopped (capture stays), then detached.
    net.stop_enforcer(a, false).unwrap();
    assert_ne!(web_to_outside(&net), Some(0));
    let out = net
        .run(
            a,
            None,
            enforcer_bin.to_str().unwrap(),
            &["detach", "--config", config.to_str().unwrap()],
            T,
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("capture detached"));
    assert!(!net.pin_dir(a).exists());
    assert_eq!(
        web_to_outside(&net),
        Some(0),
        "uncaptured once detached: the refusals were capture's"
    );
}
