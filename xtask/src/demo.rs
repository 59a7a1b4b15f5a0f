//! `cargo xtask demo`: three hosts behind Tessera and one outsider, real unmodified programs
//! (python3 http.server, redis-server, curl, redis-cli), traffic through the tunnels and
//! attempts around them; then two hosts in TCP-handshake mode; then the connectivity map
//! built from both ends' flow records.
use std::{fs, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use tessera_tests::TestNet;

const T: Duration = Duration::from_secs(20);

const DEMO_POLICY: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
    ports: [8080]
  - name: api-to-db
    action: allow
    from: [{labels: [app=api]}]
    to: [{labels: [app=db]}]
    ports: [6379]
";

fn step(n: usize, what: &str, ok: bool, detail: &str) {
    println!(
        "  {n}. {what:<58} {} {detail}",
        if ok { "ok  " } else { "FAIL" }
    );
}

pub fn run(bin: &Path) -> Result<()> {
    // SAFETY: single-threaded at this point; the harness reads it when starting enforcers.
    unsafe { std::env::set_var("TESSERA_BIN", bin) };
    println!(
        "Tessera demo: hosts 10.77.0.1-3 behind enforcers, 10.77.0.4 an outsider without one\n"
    );
    let net = TestNet::with_plain_hosts(&["host-a", "host-b", "host-c"], &["outsider"])?;
    let (a, b, c, o) = (
        net.host("host-a"),
        net.host("host-b"),
        net.host("host-c"),
        net.host("outsider"),
    );
    net.add_workload(a, "web", &[("app", "web"), ("tier", "frontend")], &[])?;
    net.add_workload(b, "api", &[("app", "api"), ("tier", "backend")], &[8080])?;
    net.add_workload(c, "db", &[("app", "db"), ("tier", "data")], &[6379])?;
    let policy = net.write_policy(None, DEMO_POLICY)?;
    net.start_enforcers()?;
    println!("  host-a 10.77.0.1  web (curl, redis-cli)");
    println!("  host-b 10.77.0.2  api (python3 -m http.server :8080; also a redis client)");
    println!("  host-c 10.77.0.3  db  (redis-server :6379)");
    println!("  outsider 10.77.0.4 (no enforcer: python3 -m http.server :8000, curl)\n");
    println!(
        "Policy ({}), enforced by every enforcer at both ends:\n",
        policy.display()
    );
    for line in DEMO_POLICY.lines() {
        println!("    {line}");
    }
    println!();

    let www = net.dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(
        www.join("status.json"),
        "{\"service\":\"api\",\"ok\":true}\n",
    )?;
    fs::write(www.join("bulk.bin"), vec![0x5a; 8 << 20])?;
    net.serve_http(b, Some("api"), "0.0.0.0", 8080, &www)?;
    net.serve_redis(c, Some("db"), 6379)?;
    net.serve_http(o, None, "0.0.0.0", 8000, &www)?;

    // What policy matches on: declared labels plus what the enforcer derives itself.
    let config = net.config_path(b);
    let shown = net
        .tessera(&["identity", "show", "--config", config.to_str().unwrap()])
        .context("tessera identity show")?;
    println!("Identity of api@host-b (`tessera identity show`), carried in signed tokens:\n");
    for line in shown.lines() {
        println!("    {line}");
    }
    println!();

    println!("Traffic:");
    let mut failures = 0;
    let mut check = |n: usize, what: &str, ok: bool, detail: String| {
        step(n, what, ok, &detail);
        if !ok {
            failures += 1;
        }
    };
    let status = |_| {
        net.run(
            a,
            Some("web"),
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                "--fail",
                "http://10.77.0.2:8080/status.json",
            ],
            T,
        )
    };
    // A process outside any workload (on `host`) fetching the api directly.
    let api_direct = |host| {
        net.run(
            host,
            None,
            "curl",
            &["-sS", "-m", "3", "http://10.77.0.2:8080/status.json"],
            T,
        )
    };
    let out = (0..4).map(status).last().expect("four requests")?;
    check(
        1,
        "web@host-a -> api@host-b  curl GET /status.json (x4)",
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    );
    let out = net.run(
        a,
        Some("web"),
        "curl",
        &[
            "-sS",
            "-m",
            "10",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "http://10.77.0.2:8080/bulk.bin",
        ],
        T,
    )?;
    check(
        2,
        "web@host-a -> api@host-b  curl GET /bulk.bin (8 MiB)",
        String::from_utf8_lossy(&out.stdout) == "8388608",
        format!("{} bytes", String::from_utf8_lossy(&out.stdout)),
    );
    let redis = |host, wl, args: &[&str]| -> Result<String> {
        let mut full = vec!["-h", "10.77.0.3", "-p", "6379"];
        full.extend_from_slice(args);
        let out = net.run(host, wl, "redis-cli", &full, T)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let set = redis(b, Some("api"), &["SET", "orders", "42"])?;
    let get = redis(b, Some("api"), &["GET", "orders"])?;
    check(
        3,
        "api@host-b -> db@host-c   redis-cli SET/GET orders",
        set == "OK" && get == "42",
        format!("SET {set}, GET {get}"),
    );
    let ping = redis(a, Some("web"), &["PING"])?;
    check(
        4,
        "web@host-a -> db@host-c   redis-cli PING (no rule allows)",
        ping != "PONG",
        "refused by policy".into(),
    );
    let out = api_direct(o)?;
    check(
        5,
        "outsider   -> api@host-b  direct curl (no tunnel)",
        !out.status.success(),
        "refused".into(),
    );
    let out = net.run(
        a,
        None,
        "redis-cli",
        &["-h", "10.77.0.3", "-p", "6379", "PING"],
        T,
    )?;
    let refused = !String::from_utf8_lossy(&out.stdout).contains("PONG");
    check(
        6,
        "unenrolled process on host-a -> db@host-c direct",
        refused,
        "refused".into(),
    );
    let out = net.run(
        a,
        Some("web"),
        "curl",
        &["-sS", "-m", "3", "http://10.77.0.4:8000/status.json"],
        T,
    )?;
    check(
        7,
        "web@host-a -> outsider:8000 (no enforcer serves it)",
        !out.status.success(),
        "refused".into(),
    );

    println!(
        "\nhost-a and host-b switch to TCP-handshake mode (tokens in SYN / SYN-ACK / ACK, data in the kernel):"
    );
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().handshake = true;
    for h in [a, b] {
        net.start_enforcer(h)?;
    }
    let out = status(0)?;
    let server_log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap_or_default();
    check(
        8,
        "web@host-a -> api@host-b  curl GET /status.json",
        out.status.success() && server_log.contains("10.77.0.1 - -"),
        "served to 10.77.0.1 itself: no proxy in the path".into(),
    );
    let out = api_direct(a)?;
    check(
        9,
        "unenrolled process on host-a -> api@host-b (no token)",
        !out.status.success(),
        "refused".into(),
    );
    let out = api_direct(o)?;
    check(
        10,
        "outsider   -> api@host-b  direct curl (no token)",
        !out.status.success(),
        "refused".into(),
    );

    // Both ends write their records asynchronously; give them a moment.
    std::thread::sleep(Duration::from_millis(300));
    let bin = tessera_tests::tessera_bin()?;
    let api_b = format!("{}:{}", b.addr, tessera_tests::API_PORT);
    // The APIs listen on the hosts' addresses: they need the test net's bearer token.
    let token_file = net.api_token_file()?.to_string_lossy().into_owned();
    let out = net.run(
        b,
        None,
        bin.to_str().unwrap(),
        &["flows", "--api", &api_b, "--token-file", &token_file],
        T,
    )?;
    println!("\nhost-b's flows since it restarted in handshake mode (`tessera flows`):\n");
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout)?.lines().collect();
    if let Some((header, rows)) = lines.split_first() {
        println!("{header}");
        for row in &rows[rows.len().saturating_sub(5)..] {
            println!("{row}");
        }
    }
    println!("\nConnectivity map (`tessera map`, merged from the APIs of all three enforcers):\n");
    let apis: Vec<String> = [a, b, c]
        .iter()
        .map(|h| format!("{}:{}", h.addr, tessera_tests::API_PORT))
        .collect();
    let mut args = vec!["map", "--token-file", &token_file];
    for api in &apis {
        args.extend(["--api", api.as_str()]);
    }
    // From inside host-b's namespace, which reaches every host over the bridge.
    let out = net.run(b, None, bin.to_str().unwrap(), &args, T)?;
    if !out.status.success() {
        bail!("tessera map: {}", String::from_utf8_lossy(&out.stderr));
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if failures > 0 {
        bail!("{failures} demo step(s) did not behave as expected");
    }
    println!("\nAll steps behaved as expected.");
    Ok(())
}
