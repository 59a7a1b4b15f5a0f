//! `cargo xtask demo`: a control plane and three hosts behind Tessera, plus one outsider.
//! The enforcers start with only the server's address, its CA and a one-time join token;
//! they enrol, get their certificates (with a scope: site=paris or site=lyon) and follow the
//! directory and the policy, which is applied once at the server. Then real unmodified
//! programs (python3 http.server, redis-server, curl, redis-cli) send traffic through the
//! tunnels and attempts around them; two hosts switch to TCP-handshake mode (starting from
//! their control-plane caches); a container podman starts on host-b is enrolled as it
//! starts, with its image's digest; host-a is revoked centrally; and the connectivity map
//! is built from all enforcers' flow records.
use std::{fs, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tessera_tests::{ControlServer, Podman, TestNet, eventually};

const T: Duration = Duration::from_secs(20);

/// Applied once, at the server. `site` is not something a workload or its enforcer can
/// claim: every enforcer's certificate carries its scope, stamped on its workloads.
const DEMO_POLICY: &str = "\
rules:
  - name: paris-web-to-api
    action: allow
    from: [{labels: [app=web, site=paris]}]
    to: [{labels: [app=api]}]
    ports: [8080]
  - name: api-to-db
    action: allow
    from: [{labels: [app=api]}]
    to: [{labels: [app=db]}]
    ports: [6379]
";

/// An edit with a mistake, which the server must refuse without changing anything.
fn broken_policy() -> String {
    DEMO_POLICY.replacen("ports: [8080]", "ports: [8080, http]", 1)
}

fn step(n: usize, what: &str, ok: bool, detail: &str) {
    println!(
        "  {n:>2}. {what:<58} {} {detail}",
        if ok { "ok  " } else { "FAIL" }
    );
}

fn indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// `tessera server status --json`.
fn status_json(net: &TestNet, srv: &ControlServer) -> Result<Value> {
    let text = net.control_admin(srv, &["server", "status", "--json"])?;
    serde_json::from_str(&text).context("tessera server status --json")
}

fn enforcer_field<'a>(status: &'a Value, name: &str, field: &str) -> &'a Value {
    status["enforcers"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["name"] == name))
        .map_or(&Value::Null, |e| &e[field])
}

pub fn run(bin: &Path) -> Result<()> {
    // SAFETY: single-threaded at this point; the harness reads it when starting enforcers.
    unsafe { std::env::set_var("TESSERA_BIN", bin) };
    println!(
        "Tessera demo: a control plane on 10.77.0.5; hosts 10.77.0.1-3 behind enforcers that start \
         with only\nits address, its CA and a join token; 10.77.0.4 an outsider without an enforcer\n"
    );
    let net = TestNet::with_plain_hosts(&["host-a", "host-b", "host-c"], &["outsider", "control"])?;
    let (a, b, c, o) = (
        net.host("host-a"),
        net.host("host-b"),
        net.host("host-c"),
        net.host("outsider"),
    );
    net.add_workload(a, "web", &[("app", "web"), ("tier", "frontend")], &[])?;
    net.add_workload(b, "api", &[("app", "api"), ("tier", "backend")], &[8080])?;
    net.add_workload(c, "db", &[("app", "db"), ("tier", "data")], &[6379])?;
    // Another web, at the Lyon site: the same labels, another scope.
    net.add_workload(c, "web", &[("app", "web"), ("tier", "frontend")], &[])?;
    println!("  host-a   10.77.0.1  site=paris  web (curl, redis-cli)");
    println!(
        "  host-b   10.77.0.2  site=lyon   api (python3 -m http.server :8080; also a redis client)"
    );
    println!("  host-c   10.77.0.3  site=lyon   db (redis-server :6379), and another web (curl)");
    println!("  outsider 10.77.0.4              no enforcer: python3 -m http.server :8000, curl");
    println!(
        "  control  10.77.0.5              no enforcer: `tessera server run` (CA, enrolment, directory, policy)\n"
    );

    // host-b also enrols the containers podman starts under its parent cgroup.
    let mut podman = Podman::start(&net)?;
    let containers = net.cgroup(b, Some("containers"));
    // With the runtime's hook: a container with a network of its own is served in it
    // before it runs.
    let hook = net.dir.join("containers-hook.sock");
    podman.install_hook(&net.dir, net.bin(), &hook)?;
    let mut section = podman.section(&containers);
    section.hook_socket = Some(hook);
    net.options
        .lock()
        .unwrap()
        .containers
        .insert("host-b".into(), section);
    println!(
        "  host-b also enrols the containers podman starts (`[containers]`, parent cgroup {})\n",
        containers.display()
    );

    let srv = net.start_control(net.host("control"), &[])?;
    let mut failures = 0;
    let mut check = |n: usize, what: &str, ok: bool, detail: String| {
        step(n, what, ok, &detail);
        if !ok {
            failures += 1;
        }
    };

    println!(
        "Enrolment: one join token per host (`tessera server token create --scope ...`, single use);\n\
         each enforcer's configuration has only [control]: the server's URL, its CA, the token file.\n"
    );
    for (h, scope) in [(a, "site=paris"), (b, "site=lyon"), (c, "site=lyon")] {
        let file = net.join(h, &srv, scope)?;
        println!(
            "    {}: tessera server token create --scope {scope:<10} > {}",
            h.name,
            file.file_name().unwrap().to_string_lossy()
        );
    }
    net.start_enforcers()?;
    println!("\n`tessera server status` after enrolment:\n");
    indented(&net.control_admin(&srv, &["server", "status"])?);
    println!();
    let s = status_json(&net, &srv)?;
    let enrolled = [
        ("host-a", "site=paris"),
        ("host-b", "site=lyon"),
        ("host-c", "site=lyon"),
    ]
    .iter()
    .all(|(n, scope)| {
        enforcer_field(&s, n, "state") == "active" && enforcer_field(&s, n, "scope") == *scope
    });
    check(
        1,
        "host-a, host-b, host-c enrolled with their join tokens",
        enrolled,
        "active, each in its token's scope".into(),
    );

    // The policy: applied once at the server, never written on the hosts.
    let policy_file = net.dir.join("demo-policy.yaml");
    fs::write(&policy_file, DEMO_POLICY)?;
    println!(
        "\nPolicy, applied once at the server (`tessera policy apply demo-policy.yaml --server {}`),\n\
         enforced by every enforcer at both ends:\n",
        srv.url
    );
    indented(DEMO_POLICY);
    let out = net.control_admin(&srv, &["policy", "apply", policy_file.to_str().unwrap()])?;
    println!();
    indented(out.trim());
    let in_force = eventually(Duration::from_secs(15), || {
        status_json(&net, &srv).is_ok_and(|s| {
            ["host-a", "host-b", "host-c"]
                .iter()
                .all(|n| enforcer_field(&s, n, "policy_version") == 1)
        })
    });
    println!();
    check(
        2,
        "policy version 1 in force at host-a, host-b, host-c",
        in_force,
        "reported back to the server".into(),
    );
    let broken = net.dir.join("demo-policy-edit.yaml");
    fs::write(&broken, broken_policy())?;
    let refused = net.control_admin(&srv, &["policy", "apply", broken.to_str().unwrap()]);
    let error = match &refused {
        Ok(out) => format!("accepted: {}", out.trim()),
        Err(e) => e.to_string(),
    };
    // `tessera policy apply FILE: error: FILE:LINE:COL: what`: shown from the second FILE.
    let error = error
        .split_once("error: ")
        .map_or(&*error, |(_, e)| e)
        .trim()
        .to_owned();
    let line = 1 + broken_policy()
        .lines()
        .position(|l| l.contains("http"))
        .unwrap_or(0);
    let at = format!("{}:{line}:", broken.display());
    let version = status_json(&net, &srv)?["policy_version"].clone();
    check(
        3,
        "a broken edit (`ports: [8080, http]`) is refused",
        refused.is_err() && error.contains(&at) && version == 1,
        "nothing changes: still version 1".into(),
    );
    indented(&format!("      {error}"));
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
    println!(
        "Identity of api@host-b (`tessera identity show`), carried in signed tokens with its\n\
         enforcer's scope (site=lyon, from host-b's certificate):\n"
    );
    indented(&shown);
    println!();

    println!("Traffic (tunnel mode):");
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
        4,
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
        5,
        "web@host-a -> api@host-b  curl GET /bulk.bin (8 MiB)",
        String::from_utf8_lossy(&out.stdout) == "8388608",
        format!("{} bytes", String::from_utf8_lossy(&out.stdout)),
    );
    let out = net.run(
        c,
        Some("web"),
        "curl",
        &["-sS", "-m", "5", "http://10.77.0.2:8080/status.json"],
        T,
    )?;
    // host-b saw web@host-c with host-c's scope, stamped from its certificate, and denied it.
    let seen_lyon = eventually(Duration::from_secs(5), || {
        net.flows_json(b).iter().any(|f| {
            f["src"]["labels"]["app"] == "web"
                && f["src"]["labels"]["site"] == "lyon"
                && f["verdict"] == "denied"
        })
    });
    check(
        6,
        "web@host-c -> api@host-b  curl (site=lyon, not paris)",
        !out.status.success() && seen_lyon,
        "refused by policy at host-b".into(),
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
        7,
        "api@host-b -> db@host-c   redis-cli SET/GET orders",
        set == "OK" && get == "42",
        format!("SET {set}, GET {get}"),
    );
    let ping = redis(a, Some("web"), &["PING"])?;
    check(
        8,
        "web@host-a -> db@host-c   redis-cli PING (no rule allows)",
        ping != "PONG",
        "refused by policy".into(),
    );
    let out = api_direct(o)?;
    check(
        9,
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
        10,
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
        11,
        "web@host-a -> outsider:8000 (no enforcer serves it)",
        !out.status.success(),
        "refused".into(),
    );

    println!(
        "\nhost-a and host-b restart in TCP-handshake mode (tokens in SYN / SYN-ACK / ACK, data in the kernel),\n\
         from their control-plane caches (certificate, directory, policy):"
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
        12,
        "web@host-a -> api@host-b  curl GET /status.json",
        out.status.success() && server_log.contains("10.77.0.1 - -"),
        "served to 10.77.0.1 itself: no proxy in the path".into(),
    );
    let out = api_direct(a)?;
    check(
        13,
        "unenrolled process on host-a -> api@host-b (no token)",
        !out.status.success(),
        "refused".into(),
    );
    let out = api_direct(o)?;
    check(
        14,
        "outsider   -> api@host-b  direct curl (no token)",
        !out.status.success(),
        "refused".into(),
    );

    // Both ends write their records asynchronously; give them a moment.
    std::thread::sleep(Duration::from_millis(300));
    let tessera = tessera_tests::tessera_bin()?;
    let tessera = tessera.to_str().unwrap();
    let api_b = format!("{}:{}", b.addr, tessera_tests::API_PORT);
    // The APIs listen on the hosts' addresses: they need the test net's bearer token.
    let token_file = net.api_token_file()?.to_string_lossy().into_owned();
    let flows_b = |last: usize| -> Result<()> {
        let out = net.run(
            b,
            None,
            tessera,
            &["flows", "--api", &api_b, "--token-file", &token_file],
            T,
        )?;
        let lines: Vec<&str> = std::str::from_utf8(&out.stdout)?.lines().collect();
        if let Some((header, rows)) = lines.split_first() {
            println!("{header}");
            for row in &rows[rows.len().saturating_sub(last)..] {
                println!("{row}");
            }
        }
        Ok(())
    };
    println!("\nhost-b's flows since it restarted in handshake mode (`tessera flows`):\n");
    flows_b(3)?;

    println!(
        "\nRevocation: host-a and host-b back in tunnel mode, then `tessera server enforcer revoke host-a`:"
    );
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().handshake = false;
    for h in [a, b] {
        net.start_enforcer(h)?;
    }
    let back = eventually(Duration::from_secs(10), || {
        status(0).is_ok_and(|o| o.status.success())
    });
    check(
        15,
        "web@host-a -> api@host-b  curl GET /status.json",
        back,
        "allowed (before the revocation)".into(),
    );
    net.control_admin(&srv, &["server", "enforcer", "revoke", "host-a"])?;
    // The directory change reaches host-b in about a second; until then it may still admit.
    let cut = eventually(Duration::from_secs(10), || {
        status(0).is_ok_and(|o| !o.status.success())
    });
    let out = status(0)?;
    let why = eventually(Duration::from_secs(5), || {
        net.flows_json(b)
            .iter()
            .any(|f| f["code"] == "not-in-directory")
    });
    check(
        16,
        "web@host-a -> api@host-b  after host-a's revocation",
        cut && !out.status.success() && why,
        "refused: host-b records not-in-directory".into(),
    );
    std::thread::sleep(Duration::from_millis(300));
    println!("\nhost-b's last flow record (`tessera flows`):\n");
    flows_b(1)?;
    println!("\n`tessera server status`:\n");
    indented(&net.control_admin(&srv, &["server", "status"])?);

    // A container, enrolled as podman starts it: its only process talks to the db at once.
    let name = "report";
    println!(
        "\nA container on host-b with a network of its own: `podman run --network none --cgroup-parent=... --label app=api`\n\
         (image {} imported from busybox-static; the runtime's hook has host-b serve its namespace before it runs);\n\
         its first instruction sends a redis PING to db@host-c:",
        podman.image
    );
    let out = podman.run_with_network(
        &containers,
        name,
        &[("app", "api")],
        "none",
        &["sh", "-c", "printf 'PING\\r\\n' | nc -w 5 10.77.0.3 6379"],
        T,
    )?;
    let digest = podman.image_digest()?;
    let answered = String::from_utf8_lossy(&out.stdout).contains("PONG");
    let recorded = eventually(Duration::from_secs(5), || {
        net.flows_json(c).iter().any(|f| {
            f["src"]["workload"] == name
                && f["verdict"] == "allowed"
                && f["src"]["labels"]["tessera.io/image-digest"] == digest.as_str()
        })
    });
    check(
        17,
        "report (container) @host-b -> db@host-c  redis PING",
        answered && recorded,
        format!(
            "+PONG; host-c records its identity from podman: image-digest {}…",
            &digest[..19.min(digest.len())]
        ),
    );

    // Every enforcer sends its own map with its report (every 2 s here): the control plane
    // merges them into the fleet's.
    let fleet_json = || -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &net.control_admin(&srv, &["map", "--format", "json"])?,
        )?)
    };
    // web -> api seen by both ends, and host-b's refusal of the revoked host-a's tunnel
    // (sent with host-b's next report).
    let both_ends = |m: &serde_json::Value| {
        m["edges"].as_array().is_some_and(|edges| {
            edges.iter().any(|e| {
                e["src"] == "web@host-a"
                    && e["dst"] == "api@host-b"
                    && e["verdict"] == "allowed"
                    && e["reporters"].as_array().map_or(0, Vec::len) == 2
            }) && edges
                .iter()
                .any(|e| e["port"] == 15008 && e["verdict"] == "denied")
        })
    };
    let fleet_ok = tessera_tests::eventually(Duration::from_secs(15), || {
        fleet_json().is_ok_and(|m| both_ends(&m))
    });
    check(
        18,
        "the fleet's map at the control plane",
        fleet_ok,
        if fleet_ok {
            "web -> api from both ends (once); host-a's refused tunnel".into()
        } else {
            "no edge web -> api reported by both ends, or no refused tunnel of host-a".into()
        },
    );
    println!(
        "\nConnectivity map of the fleet (`tessera map --server`: every enforcer's own map, sent\n\
         with its reports and merged at the control plane). The row to port 15008 is host-a's\n\
         tunnel refused after its revocation (not in the directory):\n"
    );
    print!("{}", net.control_admin(&srv, &["map"])?);
    if failures > 0 {
        bail!("{failures} demo step(s) did not behave as expected");
    }
    println!("\nAll steps behaved as expected.");
    Ok(())
}
