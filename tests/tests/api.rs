//! End-to-end tests of the API's defences and of the enforcer's own files, as attacks on
//! real enforcers on test hosts with real curl:
//!
//! * a loopback API serves only requests addressed to an IP address or `localhost`: a DNS
//!   rebinding page (its own name in `Host`) gets 403;
//! * an API off loopback needs the bearer token (401 without it), and does not start
//!   without a private token file;
//! * `?peers=` fetches only configured peers' APIs, and a peer that floods, drips or
//!   stalls is cut off within the size and time limits;
//! * the flow log and the map database are 0600 in 0700 directories, older world-readable
//!   ones are tightened, someone else's file or a symbolic link in their place is refused;
//! * a map database locked by another process stops the start at once, naming the file.
use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tessera_tests::{API_PORT, Host, TestNet, tessera_bin};

const T: Duration = Duration::from_secs(60);

struct Answer {
    status: u16,
    body: String,
    took: Duration,
}

/// `curl ARGS` on `host`: the status (0: no HTTP answer), the body and how long it took.
fn curl(net: &TestNet, host: &str, args: &[&str]) -> Answer {
    let mut full = vec!["-sS", "-m", "20", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let start = Instant::now();
    let out = net.run(net.host(host), None, "curl", &full, T).unwrap();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        took,
    }
}

/// [`curl`] of `url` on `host` with the API's bearer token.
fn authed(net: &TestNet, host: &str, url: &str) -> Answer {
    let bearer = format!("Authorization: Bearer {}", net.api_token().unwrap());
    curl(net, host, &["-H", &bearer, url])
}

/// Starts `host`'s enforcer, which must refuse to, with an error that says `want`.
fn start_refused(net: &TestNet, host: &Host, want: &str) {
    let e = net.start_enforcer(host).expect_err(want).to_string();
    assert!(e.contains(want), "{e}");
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn uid(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().uid()
}

fn root_uid() -> u32 {
    unsafe { libc::geteuid() }
}

/// DNS rebinding: a page on attacker.example makes its name resolve to 127.0.0.1; the
/// browser then sends its requests, with `Host: attacker.example`, to the loopback API.
#[test]
fn a_loopback_api_refuses_requests_addressed_to_a_name() {
    let net = TestNet::new(&["host-a"]).expect("test hosts");
    {
        let mut o = net.options.lock().unwrap();
        o.api_loopback = true;
        o.api_token = false;
    }
    net.start_enforcers().unwrap();
    let base = format!("http://127.0.0.1:{API_PORT}");
    // What the rebound browser sends: its own name, resolved to the loopback address.
    let rebound = format!("attacker.example:{API_PORT}:127.0.0.1");
    for path in [
        "/api/flows",
        "/api/map",
        "/metrics",
        "/",
        "/api/flows/follow",
    ] {
        let a = curl(
            &net,
            "host-a",
            &[
                "--resolve",
                &rebound,
                &format!("http://attacker.example:{API_PORT}{path}"),
            ],
        );
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        assert!(
            a.body
                .contains("Host \"attacker.example:15090\" refused: this API listens on loopback"),
            "{path}: {}",
            a.body
        );
        let a = curl(
            &net,
            "host-a",
            &["-H", "Host: attacker.example", &format!("{base}{path}")],
        );
        assert_eq!(a.status, 403, "{path} with Host: attacker.example");
    }
    // Addressed to an IP address or localhost: served.
    let a = curl(&net, "host-a", &[&format!("{base}/api/flows")]);
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));
    for host in ["localhost", "localhost:15090", "127.0.0.1", "[::1]:15090"] {
        let a = curl(
            &net,
            "host-a",
            &["-H", &format!("Host: {host}"), &format!("{base}/api/map")],
        );
        assert_eq!(a.status, 200, "Host: {host}: {}", a.body);
    }
}

/// A client on another host, without the token, reads nothing; with it, everything; and
/// the CLI sends it with --token-file.
#[test]
fn an_api_off_loopback_needs_the_bearer_token() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.start_enforcers().unwrap();
    let base = format!("http://10.77.0.1:{API_PORT}");
    for path in [
        "/api/flows",
        "/api/map",
        "/metrics",
        "/",
        "/api/flows/follow",
    ] {
        let a = curl(&net, "host-b", &[&format!("{base}{path}")]);
        assert_eq!(a.status, 401, "{path}: {}", a.body);
        assert!(
            a.body.contains("needs `Authorization: Bearer <token>`"),
            "{path}: {}",
            a.body
        );
    }
    let token = net.api_token().unwrap();
    let mut wrong = token.clone();
    wrong.pop();
    for auth in [
        format!("Authorization: Bearer {wrong}"),
        format!("Authorization: Bearer {token}x"),
        format!("Authorization: Basic {token}"),
        "Authorization: Bearer ".to_owned(),
    ] {
        let a = curl(&net, "host-b", &["-H", &auth, &format!("{base}/api/flows")]);
        assert_eq!(a.status, 401, "{auth}");
    }
    let a = authed(&net, "host-b", &format!("{base}/api/flows"));
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));
    let a = authed(&net, "host-b", &format!("{base}/metrics"));
    assert_eq!(a.status, 200);
    assert!(a.body.contains("tessera_open_connections"), "{}", a.body);

    // The CLI: refused without the token (saying why), served with it.
    let bin = tessera_bin().unwrap();
    let bin = bin.to_str().unwrap();
    let api = format!("10.77.0.1:{API_PORT}");
    let out = net
        .run(net.host("host-b"), None, bin, &["flows", "--api", &api], T)
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("401 Unauthorized") && err.contains("--token-file"),
        "{err}"
    );
    let token_file = net.api_token_file().unwrap();
    let token_file = token_file.to_str().unwrap();
    for args in [
        &["flows", "--api", &api, "--json", "--token-file", token_file][..],
        &[
            "map",
            "--api",
            &api,
            "--format",
            "json",
            "--token-file",
            token_file,
        ][..],
    ] {
        let out = net.run(net.host("host-b"), None, bin, args, T).unwrap();
        assert!(
            out.status.success(),
            "tessera {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Off loopback without a token file, or with one others can read or someone else owns:
/// the enforcer does not start, and says which field and file.
#[test]
fn an_api_off_loopback_without_a_private_token_file_does_not_start() {
    let net = TestNet::new(&["host-a"]).expect("test hosts");
    let host = net.host("host-a");
    net.options.lock().unwrap().api_token = false;
    let e = net
        .start_enforcer(host)
        .expect_err("no token file")
        .to_string();
    assert!(
        e.contains("flows.api: 10.77.0.1:15090 is not a loopback address")
            && e.contains("flows.api_token_file"),
        "{e}"
    );
    net.options.lock().unwrap().api_token = true;
    let file = net.api_token_file().unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    start_refused(
        &net,
        host,
        &format!(
            "flows.api_token_file: {} is mode 0644: it must be 0600 or stricter",
            file.display()
        ),
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    start_refused(
        &net,
        host,
        &format!(
            "flows.api_token_file: {} is owned by uid 65534, not by the enforcer's user",
            file.display()
        ),
    );
    std::os::unix::fs::chown(&file, Some(root_uid()), None).unwrap();
    net.start_enforcer(host).unwrap();
}

/// A listener that records every connection it gets: what a peers= fetch would reach.
const RECORDER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, peer = s.accept()
    print("connection from", peer, flush=True)
    c.close()
"#;

/// `?peers=` names only configured enforcers' APIs (address or name); anything else is
/// refused without a connection being made.
#[test]
fn peers_outside_the_configuration_are_refused() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.start_enforcers().unwrap();
    // A service on host-b the API must not be made to fetch from.
    let recorder = net.dir.join("recorder.py");
    fs::write(&recorder, RECORDER).unwrap();
    let pid = net
        .spawn(
            net.host("host-b"),
            None,
            "python3",
            &[recorder.to_str().unwrap(), "10.77.0.2", "9999"],
        )
        .unwrap();
    net.wait_listening(pid, 9999).unwrap();
    let map = |peers: &str| {
        authed(
            &net,
            "host-b",
            &format!("http://10.77.0.2:{API_PORT}/api/map?peers={peers}"),
        )
    };
    // Not configured peers' APIs: refused, naming the address, and nothing is connected to.
    for bad in [
        "10.77.0.2:9999",
        "10.77.0.9:15090",
        "127.0.0.1:15090",
        "169.254.169.254:80",
        // A real peer, but not its API.
        "10.77.0.1:15008",
        "host-z",
    ] {
        let a = map(&format!("10.77.0.1:15090,{bad}"));
        assert_eq!(a.status, 400, "peers={bad}: {}", a.body);
        assert!(
            a.body.starts_with(&format!(
                "peers: {bad:?} is not the API of a configured peer"
            )),
            "{}",
            a.body
        );
    }
    thread::sleep(Duration::from_millis(300));
    let log = fs::read_to_string(net.dir.join("host-b-other-python3.log")).unwrap();
    assert!(!log.contains("connection"), "the API connected: {log}");
    // A configured peer, by its API address or its name: fetched and merged.
    for ok in ["10.77.0.1:15090", "host-a", "host-a,10.77.0.1:15090"] {
        let a = map(ok);
        assert_eq!(a.status, 200, "peers={ok}: {}", a.body);
    }
}

/// A peer API that misbehaves, on the address of a configured peer (its enforcer stopped):
/// `huge` sends 64 MiB of body (no length) then waits, `drip` sends a byte every 100 ms,
/// `silent` never answers. Each connection's end is logged with what was sent.
const FAKE_PEER: &str = r#"
import socket, sys, threading, time
addr, port, modefile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"

def handle(c):
    mode = open(modefile).read().strip()
    start, sent, how = time.monotonic(), 0, "ended"
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            got = c.recv(4096)
            if not got:
                break
            data += got
        if mode == "huge":
            c.sendall(HEAD)
            block = b"[" + b" " * 65535
            while sent < 64 << 20:
                c.sendall(block)
                sent += len(block)
            how = "sent everything"
            time.sleep(30)
        elif mode == "drip":
            c.sendall(HEAD)
            while True:
                c.sendall(b" ")
                sent += 1
                time.sleep(0.1)
        else:
            c.settimeout(30)
            if c.recv(1) == b"":
                how = "closed by client"
    except OSError as e:
        how = "closed by client (%s)" % e.__class__.__name__
    print("%s sent=%d after=%.1fs %s" % (mode, sent, time.monotonic() - start, how), flush=True)
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

#[test]
fn a_peer_that_floods_drips_or_stalls_is_cut_off_within_the_limits() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.start_enforcers().unwrap();
    // host-a's API address is a configured peer API of host-b; a fake answers there now.
    net.stop_enforcer(net.host("host-a"), false).unwrap();
    let script = net.dir.join("fake_peer.py");
    let modefile = net.dir.join("fake_peer.mode");
    fs::write(&script, FAKE_PEER).unwrap();
    fs::write(&modefile, "huge").unwrap();
    let pid = net
        .spawn(
            net.host("host-a"),
            None,
            "python3",
            &[
                script.to_str().unwrap(),
                "10.77.0.1",
                &API_PORT.to_string(),
                modefile.to_str().unwrap(),
            ],
        )
        .unwrap();
    net.wait_listening(pid, API_PORT).unwrap();
    let log = net.dir.join("host-a-other-python3.log");
    let fetch = || {
        authed(
            &net,
            "host-b",
            &format!("http://10.77.0.2:{API_PORT}/api/map?peers=10.77.0.1:{API_PORT}"),
        )
    };
    // The fake's line about the connection that just ended.
    let ended = |mode: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.starts_with(mode)) {
                return l.to_owned();
            }
            assert!(Instant::now() < deadline, "no end of {mode} logged: {text}");
            thread::sleep(Duration::from_millis(50));
        }
    };
    let peer = format!("peer \"host-a\" (http://10.77.0.1:{API_PORT}/api/map)");

    // An endless body: cut off at 8 MiB as it arrives, well before the time limit.
    let a = fetch();
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body
            .contains(&format!("{peer}: its answer is larger than 8 MiB: cut off")),
        "{}",
        a.body
    );
    assert!(a.took < Duration::from_secs(3), "took {:?}", a.took);
    let line = ended("huge");
    let sent: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sent="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        line.contains("closed by client") && sent < 32 << 20,
        "the enforcer read on: {line}"
    );

    // A body that never ends, a byte at a time, and no answer at all: each cut off at the
    // time limit.
    for mode in ["drip", "silent"] {
        fs::write(&modefile, mode).unwrap();
        let a = fetch();
        assert_eq!(a.status, 502, "{mode}: {}", a.body);
        assert!(
            a.body
                .contains(&format!("{peer}: no complete answer within 3 s: cut off")),
            "{mode}: {}",
            a.body
        );
        assert!(
            a.took >= Duration::from_millis(2900) && a.took < Duration::from_millis(4500),
            "{mode}: took {:?}",
            a.took
        );
        assert!(ended(mode).contains("closed by client"));
    }

    // The enforcer is unharmed: its own map is served at once.
    let a = authed(
        &net,
        "host-b",
        &format!("http://10.77.0.2:{API_PORT}/api/map"),
    );
    assert_eq!(a.status, 200, "{}", a.body);
}

/// The flow log and the map database are private to the enforcer's user: made 0600 in
/// directories made 0700; a world-readable one (as older versions left them) is tightened
/// at start; a file someone else made, or a symbolic link, in their place stops the start.
#[test]
fn the_enforcer_keeps_its_files_private() {
    let net = TestNet::new(&["host-a"]).expect("test hosts");
    let host = net.host("host-a");
    net.options.lock().unwrap().state_subdir = Some("state/host-a".into());
    net.start_enforcers().unwrap();
    let (log, db, state) = (net.flow_log(host), net.map_db(host), net.state_dir());
    let me = root_uid();
    for dir in [state.parent().unwrap(), &state] {
        assert_eq!((mode(dir), uid(dir)), (0o700, me), "{}", dir.display());
    }
    for file in [&log, &db] {
        assert_eq!((mode(file), uid(file)), (0o600, me), "{}", file.display());
    }
    // An unprivileged user can neither read nor lock them.
    let out = net
        .run(
            host,
            None,
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "python3",
                "-c",
                "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'rb'), fcntl.LOCK_EX)",
                db.to_str().unwrap(),
            ],
            T,
        )
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "nobody opened the map database: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // World-readable files, as older versions made them: tightened at start.
    net.stop_enforcer(host, false).unwrap();
    for file in [&log, &db] {
        fs::set_permissions(file, fs::Permissions::from_mode(0o644)).unwrap();
    }
    net.start_enforcer(host).unwrap();
    for file in [&log, &db] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert!(
        net.enforcer_log(host)
            .contains("tightened to mode 0600: only the enforcer's user may read it"),
        "{}",
        net.enforcer_log(host)
    );

    // Someone else's file in the flow log's place (made to read what is appended): refused.
    net.stop_enforcer(host, false).unwrap();
    fs::remove_file(&log).unwrap();
    fs::write(&log, "").unwrap();
    std::os::unix::fs::chown(&log, Some(65534), Some(65534)).unwrap();
    start_refused(
        &net,
        host,
        &format!(
            "flows.log: {} is owned by uid 65534, not by this process's user (uid {me})",
            log.display()
        ),
    );
    // A symbolic link in the database's place (made to write elsewhere): refused.
    fs::remove_file(&log).unwrap();
    let elsewhere = net.dir.join("elsewhere");
    fs::write(&elsewhere, "precious").unwrap();
    fs::rename(&db, net.dir.join("map.redb.saved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &db).unwrap();
    start_refused(
        &net,
        host,
        &format!(
            "flows.map_db: {} is a symbolic link: refusing to follow it",
            db.display()
        ),
    );
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "precious");
}

/// Holds an exclusive `flock` on a file, as redb (and so another enforcer) does.
const HOLDER: &str = "import fcntl, sys, time
f = open(sys.argv[1], 'rb+')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('locked', flush=True)
time.sleep(120)
";

#[test]
fn a_map_db_locked_by_another_process_stops_the_start_naming_the_file() {
    let net = TestNet::new(&["host-a"]).expect("test hosts");
    let host = net.host("host-a");
    net.start_enforcers().unwrap();
    let db = net.map_db(host);
    let want = format!(
        "flows.map_db: {} is locked by another process",
        db.display()
    );
    // A second enforcer with the same configuration while the first runs.
    let bin = tessera_bin().unwrap();
    let config = net.config_path(host);
    let start = Instant::now();
    let out = net
        .run(
            host,
            None,
            bin.to_str().unwrap(),
            &["run", "--config", config.to_str().unwrap()],
            T,
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&want), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // Any process holding the lock while the enforcer starts.
    net.stop_enforcer(host, false).unwrap();
    let pid = net
        .spawn(host, None, "python3", &["-c", HOLDER, db.to_str().unwrap()])
        .unwrap();
    let holder_log = net.dir.join("host-a-other-python3.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(&holder_log)
        .unwrap_or_default()
        .contains("locked")
    {
        assert!(Instant::now() < deadline, "the holder never locked");
        thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    start_refused(&net, host, &want);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The lock gone, it starts.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    thread::sleep(Duration::from_millis(200));
    net.start_enforcer(host).unwrap();
}
