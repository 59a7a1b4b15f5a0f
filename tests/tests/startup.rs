//! End-to-end tests that an enforcer's start-up is all or nothing (root, real eBPF, real
//! iptables, real programs): a start that fails at any step leaves the previous run's
//! capture and rules in force exactly as they were, and switching between tunnel and
//! handshake mode never leaves a protected port open to a direct connection, not even for a
//! moment.
//!
//! The workload is a small python server that logs every connection it accepts: a probe
//! from an outsider (a host without an enforcer) that reaches it is in its log, whatever the
//! outsider itself saw.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use tessera_tests::{TUNNEL_PORT, TestNet};

const PORT: u16 = 7000;
const API: &str = "10.77.0.2";
const SECS_30: Duration = Duration::from_secs(30);

/// The protected workload: logs "accepted <address>" for each connection, echoes one read.
const APP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    print("accepted", peer[0], flush=True)
    c.settimeout(2)
    try:
        c.sendall(c.recv(100))
    except OSError:
        pass
    c.close()
"#;

/// A client: sends a line, prints what comes back.
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello\n")
print(s.recv(100).decode().strip(), flush=True)
"#;

/// The outsider's prober: connects to HOST:PORT in a tight loop (each connect at most
/// 200 ms, 5 ms apart) until STOP exists, SECS pass or 20,000 tries; prints how many.
const PROBER: &str = r#"
import os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + float(sys.argv[4])
n = 0
while not os.path.exists(stop) and time.time() < deadline and n < 20000:
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect((host, port))
        s.sendall(b"probe\n")
    except OSError:
        pass
    finally:
        s.close()
    n += 1
    time.sleep(0.005)
print("probes", n, flush=True)
"#;

/// Holds an exclusive `flock` on a file, as redb (and so another enforcer) does.
const LOCK_HOLDER: &str = "import fcntl, sys, time
f = open(sys.argv[1], 'rb+')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('locked', flush=True)
time.sleep(120)
";

/// Listens on ADDR:PORT (as another process would, on a port the enforcer needs).
const PORT_HOLDER: &str = "import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print('locked', flush=True)
time.sleep(120)
";

/// web@host-a, api@host-b (port 7000, only web may reach it), and an outsider; both
/// enforcers in tunnel mode, leaving capture attached when stopped; the app serving.
fn setup() -> TestNet {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["outsider"]).expect("test hosts");
    net.options.lock().unwrap().keep_attached = true;
    net.add_web_to_api(PORT).unwrap();
    net.start_enforcers().unwrap();
    let pid = net
        .spawn(
            net.host("host-b"),
            Some("api"),
            "python3",
            &["-c", APP, &PORT.to_string()],
        )
        .unwrap();
    net.wait_listening(pid, PORT).unwrap();
    net
}

/// How many connections the app accepted so far.
fn accepted(net: &TestNet) -> usize {
    fs::read_to_string(net.dir.join("host-b-api-python3.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("accepted"))
        .count()
}

/// web@host-a's request to the api: answered through Tessera.
fn web_reaches_api(net: &TestNet) {
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "python3",
            &["-c", CLIENT, API, &PORT.to_string()],
            SECS_30,
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello",
        "web could not reach api: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` direct connections from the outsider to the protected port: none may reach the app.
fn outsider_is_refused(net: &TestNet, when: &str) {
    let before = accepted(net);
    let stop = net.dir.join("never");
    let out = net
        .run(
            net.host("outsider"),
            None,
            "python3",
            &[
                "-c",
                PROBER,
                API,
                &PORT.to_string(),
                stop.to_str().unwrap(),
                "1",
            ],
            SECS_30,
        )
        .unwrap();
    let probes = String::from_utf8_lossy(&out.stdout);
    assert!(probes.starts_with("probes "), "{probes}");
    assert_eq!(
        accepted(net),
        before,
        "{when}: a direct connection from the outsider reached the protected app ({probes})"
    );
}

/// What host-b has in force: the generations of links pinned, and its iptables rules.
fn in_force(net: &TestNet) -> (Vec<String>, String) {
    let links = net.pin_dir(net.host("host-b")).join("links");
    let mut generations: Vec<String> = fs::read_dir(&links)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    generations.sort();
    (generations, rules(net))
}

/// host-b's iptables and ip6tables rules (raw and mangle), as `-S` lists them.
fn rules(net: &TestNet) -> String {
    let mut all = String::new();
    for tool in ["iptables", "ip6tables"] {
        for table in ["raw", "mangle"] {
            let out = net
                .run(
                    net.host("host-b"),
                    None,
                    tool,
                    &["-w", "-t", table, "-S"],
                    SECS_30,
                )
                .unwrap();
            assert!(out.status.success(), "{tool} -t {table} -S");
            all += &String::from_utf8_lossy(&out.stdout);
        }
    }
    all
}

/// Runs `script` on host-b (outside the workloads) until it prints "locked"; returns its pid.
fn hold(net: &TestNet, name: &str, script: &str, args: &[&str]) -> u32 {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let pid = net
        .spawn(net.host("host-b"), None, "python3", &all)
        .unwrap();
    let log = net.dir.join("host-b-other-python3.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("locked")
    {
        assert!(
            Instant::now() < deadline,
            "{name}: the holder never started"
        );
        thread::sleep(Duration::from_millis(20));
    }
    pid
}

fn kill(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/stat")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
}

/// `file` replaced by `with` until the guard is dropped.
struct Swapped {
    file: PathBuf,
    saved: Vec<u8>,
}

impl Swapped {
    fn new(file: PathBuf, with: &[u8]) -> Self {
        let saved = fs::read(&file).unwrap();
        fs::write(&file, with).unwrap();
        Self { file, saved }
    }
}

impl Drop for Swapped {
    fn drop(&mut self) {
        let _ = fs::write(&self.file, &self.saved);
    }
}

/// Runs `iptables ARGS` in host-b's namespace.
fn iptables(net: &TestNet, args: &str) {
    let args: Vec<&str> = std::iter::once("-w")
        .chain(args.split_whitespace())
        .collect();
    let out = net
        .run(net.host("host-b"), None, "iptables", &args, SECS_30)
        .unwrap();
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Threat: a restart whose start-up fails part-way (the map database locked by another
/// process, a peer certificate from another CA, a broken key, a port or NFQUEUE another
/// process holds, an iptables chain in the way) used to leave the host with the new run's
/// settings written and its protected ports rewritten, but neither its listeners nor its
/// rules: a switch to handshake mode that failed left the workload's port open to anyone.
/// After: each failed start leaves the previous run's links and rules exactly as they were,
/// and a direct connection from an outsider to the protected port never reaches the app;
/// the next good start serves.
#[test]
fn a_start_that_fails_at_any_step_leaves_the_previous_run_in_force() {
    let net = setup();
    let b = net.host("host-b");
    web_reaches_api(&net);
    outsider_is_refused(&net, "tunnel mode, serving");
    // A restart: the enforcer stops leaving capture attached (fail closed meanwhile).
    net.stop_enforcer(b, false).unwrap();
    let before = in_force(&net);
    assert_eq!(before.0.len(), 1, "one generation of links: {before:?}");
    assert!(!before.1.contains("TESSERA"), "{}", before.1);
    outsider_is_refused(&net, "enforcer stopped, capture attached");

    // Each start tries handshake mode (a mode switch) and fails at one step.
    net.options.lock().unwrap().handshake = true;
    let other_ca = net.dir.join("other-ca");
    let ca = other_ca.to_str().unwrap();
    net.tessera(&["ca", "init", "--dir", ca]).unwrap();
    net.tessera(&[
        "ca",
        "issue",
        "--ca-dir",
        ca,
        "--name",
        "host-a",
        "--out-dir",
        ca,
    ])
    .unwrap();
    type Fault<'a> = (
        &'a str,
        &'a str,
        Box<dyn Fn() -> Box<dyn FnOnce() + 'a> + 'a>,
    );
    let map_db = net.map_db(b);
    let (net, other_ca, map_db) = (&net, &other_ca, &map_db);
    let faults: Vec<Fault> = vec![
        (
            "a map database locked by another process",
            "is locked by another process",
            Box::new(move || {
                let pid = hold(net, "lock", LOCK_HOLDER, &[map_db.to_str().unwrap()]);
                Box::new(move || kill(pid))
            }),
        ),
        (
            "a peer certificate from another CA",
            "peer[0] \"host-a\": cert:",
            Box::new(move || {
                let forged = fs::read(other_ca.join("host-a.pem")).unwrap();
                let swapped = Swapped::new(net.dir.join("ca/host-a.pem"), &forged);
                Box::new(move || drop(swapped))
            }),
        ),
        (
            "a broken key",
            "host-b.key",
            Box::new(move || {
                let swapped = Swapped::new(net.dir.join("ca/host-b.key"), b"not a key\n");
                Box::new(move || drop(swapped))
            }),
        ),
        (
            "the tunnel port held by another process",
            "listen.tunnel: cannot listen",
            Box::new(move || {
                // Only tunnel mode listens there: this start stays in tunnel mode.
                net.options.lock().unwrap().handshake = false;
                let port = TUNNEL_PORT.to_string();
                let pid = hold(net, "port", PORT_HOLDER, &[API, &port]);
                Box::new(move || {
                    net.options.lock().unwrap().handshake = true;
                    kill(pid)
                })
            }),
        ),
        (
            "an NFQUEUE held by another process",
            "cannot bind NFQUEUE 7700",
            Box::new(move || {
                let pid = net
                    .spawn(
                        b,
                        None,
                        env!("CARGO_BIN_EXE_tamper_queue"),
                        &["7700", "drop"],
                    )
                    .unwrap();
                let log = net.dir.join(format!(
                    "host-b-other-{}.log",
                    env!("CARGO_BIN_EXE_tamper_queue").replace('/', "_")
                ));
                let deadline = Instant::now() + Duration::from_secs(10);
                while !fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("ready")
                {
                    assert!(Instant::now() < deadline, "the queue holder never bound");
                    thread::sleep(Duration::from_millis(20));
                }
                Box::new(move || kill(pid))
            }),
        ),
        (
            "an iptables chain of that name in the way",
            "handshake-mode iptables rules",
            Box::new(move || {
                // A chain named like ours that another rule refers to: ours cannot be made.
                iptables(net, "-t raw -N TESSERA-HS-RAW1");
                iptables(net, "-t raw -N IN-THE-WAY");
                iptables(net, "-t raw -A IN-THE-WAY -j TESSERA-HS-RAW1");
                Box::new(move || {
                    iptables(net, "-t raw -F IN-THE-WAY");
                    iptables(net, "-t raw -X IN-THE-WAY");
                    iptables(net, "-t raw -X TESSERA-HS-RAW1");
                })
            }),
        ),
    ];
    for (what, says, fault) in faults {
        let undo = fault();
        // This start's log only.
        let _ = fs::remove_file(net.log_path(b));
        let err = net
            .start_enforcer(b)
            .expect_err(&format!("{what}: the start succeeded"))
            .to_string();
        undo();
        let last = err
            .lines()
            .rev()
            .find(|l| l.contains("Error") || l.contains(says));
        assert!(err.contains(says), "{what}: not {says:?}: {last:?}\n{err}");
        outsider_is_refused(net, &format!("after a start failing on {what}"));
        assert_eq!(in_force(net), before, "{what}: what was in force changed");
    }

    // A good start serves again.
    net.options.lock().unwrap().handshake = false;
    net.start_enforcer(b).unwrap();
    web_reaches_api(net);
    outsider_is_refused(net, "restarted");
}

/// Threat: switching an enforcer from tunnel to handshake mode emptied the protected ports
/// before the handshake rules existed: for that moment a direct connection reached the
/// workload unauthenticated; and switching back left the handshake rules behind. After:
/// with an outsider connecting to the protected port in a tight loop throughout
/// tunnel -> handshake -> tunnel, no probe ever reaches the app, and the handshake rules
/// are gone once back in tunnel mode.
#[test]
fn switching_modes_never_lets_a_direct_connection_through() {
    let net = setup();
    let b = net.host("host-b");
    web_reaches_api(&net);
    let before = accepted(&net);
    let stop = net.dir.join("stop-probing");
    net.spawn(
        net.host("outsider"),
        None,
        "python3",
        &[
            "-c",
            PROBER,
            API,
            &PORT.to_string(),
            stop.to_str().unwrap(),
            "120",
        ],
    )
    .unwrap();
    let probes_log = net.dir.join("outsider-other-python3.log");
    thread::sleep(Duration::from_millis(500));
    for handshake in [true, false, true, false] {
        net.stop_enforcer(b, false).unwrap();
        net.options.lock().unwrap().handshake = handshake;
        net.start_enforcer(b).unwrap();
        thread::sleep(Duration::from_millis(300));
    }
    fs::write(&stop, "").unwrap();
    let deadline = Instant::now() + SECS_30;
    let probes = loop {
        let log = fs::read_to_string(&probes_log).unwrap_or_default();
        if let Some(n) = log.lines().find_map(|l| l.strip_prefix("probes ")) {
            break n.trim().parse::<usize>().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the prober never finished: {log}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        probes >= 20,
        "only {probes} probes: the loop tested nothing"
    );
    assert_eq!(
        accepted(&net),
        before,
        "{} of {probes} direct connections reached the app during the mode switches",
        accepted(&net) - before
    );
    let rules = rules(&net);
    // (Tunnel mode's own reply routing, TESSERA-DELIVER, stays: it is this mode's.)
    assert!(
        !rules.contains("TESSERA-HS"),
        "back in tunnel mode, handshake rules were left behind:\n{rules}"
    );
    web_reaches_api(&net);
}
