//! `tessera`: the enforcer daemon and its command-line tools. This file is only the command
//! line (arguments and dispatch); what the commands do is in the `tessera_enforcer` library.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use tessera_enforcer::{
    ca, client, config, daemon, fleetview, flowlog, flowstore, identity_show, map, server,
};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Transparent, identity-aware network enforcer",
    long_about = "Tessera captures the TCP connections of enrolled workloads (cgroups) with eBPF, \
decides each by policy on the identities at both ends, and carries the allowed ones to the \
peer enforcer through mutual-TLS tunnels (tunnel mode) or proves them in the TCP handshake \
(handshake mode). Applications are unchanged; connections that cannot be decided are \
refused (fail closed).\n\n\
One binary is the enforcer daemon (`tessera run`), its control plane (`tessera server run`) \
and the tools to administer and inspect both. `tessera COMMAND --help` describes each \
command.",
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// Log format of the daemon.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

/// The FILES, ENVIRONMENT and EXAMPLES of `tessera --help` (and of its manual page).
const AFTER_HELP: &str = "\
Files:
  /etc/tessera/enforcer.toml      the enforcer's configuration (`tessera run --config`)
  /etc/tessera/server.env         the control plane's arguments under systemd
  /var/lib/tessera/control/       the enforcer's key, certificate, cached directory, policy
  /var/lib/tessera/<name>/        the enforcer's flow map database (map.redb)
  /var/lib/tessera/server/        the control plane's store, ca.pem and admin.token
  /sys/fs/bpf/tessera/<name>/     pinned eBPF maps and links (capture across restarts)

Environment:
  RUST_LOG    log filter of the daemons (default `info`), e.g. `tessera=debug`

Examples:
  tessera check /etc/tessera/enforcer.toml
  tessera run --config /etc/tessera/enforcer.toml --keep-attached
  tessera server token create --scope site=paris
  tessera policy apply policy.yaml
  tessera flows --verdict denied
  tessera map --server https://10.0.0.10:15100

Under systemd: tessera-enforcer.service and tessera-server.service.";

#[derive(Subcommand)]
enum Command {
    /// Run the enforcer: capture enrolled workloads' connections and carry them through tunnels.
    #[command(
        long_about = "Run the enforcer daemon until SIGTERM or SIGINT: load the eBPF capture \
programs onto the enrolled workloads' cgroups, enrol with the control plane if the \
configuration has a [control] section (a join token at the first start, the cached \
certificate after), and carry every captured connection by policy.\n\n\
A new run attaches beside the capture a previous run left pinned and takes over without a \
gap. With --keep-attached the capture stays in force when this run exits, so captured \
connections are refused (fail closed) until an enforcer is back: a restart or an upgrade \
never lets a connection through uncaptured. Without it, exit detaches capture.\n\n\
Needs root or the capabilities of tessera-enforcer.service (CAP_BPF, CAP_NET_ADMIN, ...)."
    )]
    Run {
        /// The enforcer's configuration (TOML).
        #[arg(long, default_value = "/etc/tessera/enforcer.toml")]
        config: PathBuf,
        /// On exit, leave the eBPF programs attached and pinned: captured connections then
        /// fail closed until an enforcer starts again (what tessera-enforcer.service does).
        #[arg(long)]
        keep_attached: bool,
        /// Write the daemon's pid to this file once it is serving.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Take capture off this host for good (with the enforcer stopped).
    ///
    /// Detaches the eBPF programs a stopped enforcer left attached (`run --keep-attached`,
    /// as tessera-enforcer.service runs it) and removes their pins, and in handshake mode
    /// its netfilter rules: the workloads' connections are no longer captured. Refused
    /// while the enforcer of this configuration runs. The package's removal runs it.
    Detach {
        /// The enforcer's configuration (its name and `[bpf] pin_dir` say where the pins are).
        #[arg(long, default_value = "/etc/tessera/enforcer.toml")]
        config: PathBuf,
    },
    /// The container runtime's `prestart` hook: serve a new container's own network first.
    ///
    /// Reads the OCI state (JSON: `id`, `pid`) on stdin, as runtimes give it to hooks, and
    /// asks the enforcer at `--socket` (its `[containers] hook_socket`) to serve the
    /// container's network namespace before the container runs; fails if the enforcer
    /// could not serve a container of its own (the runtime then does not start it). An
    /// enforcer that cannot be reached is a warning: its capture refuses the container's
    /// connects until it serves it. Install it as an OCI hook (docs/containers.md).
    OciHook {
        /// The enforcer's hook socket.
        #[arg(long, default_value = "/run/tessera/containers.sock")]
        socket: PathBuf,
    },
    /// Validate a configuration file without running it.
    Check {
        /// The enforcer's configuration (TOML), e.g. /etc/tessera/enforcer.toml.
        config: PathBuf,
    },
    /// The control plane: enrols enforcers, issues their short-lived certificates, and
    /// distributes the directory of enforcers and the policy.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// The cluster certificate authority (static configuration without a control plane).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check a policy file, or explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Workload identities.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Flow records: from enforcers' APIs (default 127.0.0.1:15090) or flow log files.
    Flows {
        /// Enforcer API addresses (`[flows] api`); several merge.
        #[arg(long = "api")]
        apis: Vec<std::net::SocketAddr>,
        /// Flow log files (JSON lines, `[flows] log`) instead of an API.
        #[arg(long = "log")]
        logs: Vec<PathBuf>,
        /// Keep printing new records as they happen (one API).
        #[arg(long)]
        follow: bool,
        /// Print each record as one JSON object per line (JSON lines, for streaming and
        /// `jq`; `jq -s .` makes an array), not a table. Fields: docs/flows.md.
        #[arg(long)]
        json: bool,
        /// allowed | denied | observed-would-deny | error
        #[arg(long)]
        verdict: Option<String>,
        /// A workload name at either end.
        #[arg(long)]
        workload: Option<String>,
        /// Only records since this time (Unix ms).
        #[arg(long)]
        since: Option<u64>,
        /// The APIs' bearer token (`[flows] api_token_file`; mode 0600, yours).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// The connectivity map of one or more enforcers, merged into one; with `--server`, the
    /// fleet's map from the control plane.
    Map {
        /// The control plane (repeatable: tried in turn): its fleet map, every enforcer's
        /// latest merged.
        #[arg(long = "server")]
        servers: Vec<String>,
        /// With --server: the control plane's CA certificate.
        #[arg(long, default_value = "/var/lib/tessera/server/ca.pem")]
        ca: PathBuf,
        /// With --server: the administrator token file (mode 0600).
        #[arg(long, default_value = "/var/lib/tessera/server/admin.token")]
        admin_token_file: PathBuf,
        /// Enforcer API addresses (`[flows] api`); several merge.
        #[arg(long = "api")]
        apis: Vec<std::net::SocketAddr>,
        /// Flow log files (JSON lines, `[flows] log`) instead of an API.
        #[arg(long = "log")]
        logs: Vec<PathBuf>,
        /// `table`, `json` (one document: `nodes` and `edges`; fields: docs/flows.md), or
        /// Graphviz `dot` (e.g. `| dot -Tsvg > map.svg`).
        #[arg(long, default_value = "table", value_parser = ["table", "json", "dot"])]
        format: String,
        /// Mark as NEW the edges first seen more than this long after the map's first edge
        /// (the baseline window), e.g. `24h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        new_after: Option<std::time::Duration>,
        /// The APIs' bearer token (`[flows] api_token_file`; mode 0600, yours). With
        /// --serve: the token browsers must send the viewer (required off loopback).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// With --server: serve the fleet's web map on this address (e.g. 127.0.0.1:15190)
        /// until stopped, instead of printing it. The administrator token stays in this
        /// process; browsers get a read-only map.
        #[arg(long)]
        serve: Option<std::net::SocketAddr>,
    },
    /// Write the manual pages (tessera.1 and one per command) into DIR (for packaging).
    #[command(hide = true)]
    Man { out_dir: PathBuf },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Print each enrolled workload's identity (SPIFFE name and labels, declared and derived)
    /// and, for each of its processes now, the labels its connections add: what policy
    /// matches on.
    Show {
        /// The enforcer's configuration (TOML).
        #[arg(long, default_value = "/etc/tessera/enforcer.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file: every error with file, line and column; non-zero exit on error.
    Check { file: PathBuf },
    /// Validate a policy file and make it the policy of every enforcer (control plane).
    Apply {
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Write an allow policy covering what the fleet's map saw (allowed, and denied only in
    /// observe mode), grouped by labels, each rule with its evidence and whether the policy
    /// in force already allows it. Printed on stdout; check it, then `policy apply` it.
    Suggest {
        /// Label keys that name a group (repeatable); a workload without them is named by
        /// all its declared labels.
        #[arg(long = "group-by", default_value = "app")]
        group_by: Vec<String>,
        /// Only what was seen within this long.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the decision for a connection and the rule that led to it.
    Explain {
        /// The policy file (YAML).
        #[arg(long)]
        policy: PathBuf,
        /// Source identity labels, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        from: String,
        /// Source address (for a peer without an identity, or for `cidr:` rules).
        #[arg(long)]
        from_addr: Option<IpAddr>,
        /// Destination identity labels, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        to: String,
        /// Destination address.
        #[arg(long)]
        to_addr: Option<IpAddr>,
        /// Destination TCP port.
        #[arg(long)]
        port: u16,
    },
}

/// Where administration commands find the control plane.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// The control plane's address (repeatable: tried in turn).
    #[arg(long = "server", default_value = "https://127.0.0.1:15100")]
    servers: Vec<String>,
    /// The control plane's CA certificate (`ca.pem` in its state directory).
    #[arg(long, default_value = "/var/lib/tessera/server/ca.pem")]
    ca: PathBuf,
    /// The administrator token file (`admin.token` in its state directory; mode 0600).
    #[arg(long, default_value = "/var/lib/tessera/server/admin.token")]
    admin_token_file: PathBuf,
}

impl AdminArgs {
    fn target(&self) -> server::AdminTarget {
        server::AdminTarget {
            servers: self.servers.clone(),
            ca: self.ca.clone(),
            admin_token_file: self.admin_token_file.clone(),
        }
    }
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ServerCommand {
    /// Run the control plane (embedded store in --state-dir, or etcd with --store).
    #[command(
        long_about = "Run the control plane until SIGTERM or SIGINT: the fleet's CA, enrolment \
of enforcers with join tokens or instance identity documents, their short-lived \
certificates, and the directory of enforcers and the policy every enforcer follows. The \
first start creates the CA, the store and the administrator token in --state-dir \
(ca.pem, admin.token: what `tessera server token create`, `tessera policy apply` and \
`tessera server status` read by default). Needs no privileges."
    )]
    Run {
        /// The server's state: its embedded store, CA key, ca.pem and admin.token.
        #[arg(long, default_value = server::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Keep the state in etcd, shared by every server given the same URL:
        /// `etcd://host:port[,host:port...][/prefix]` (prefix default `/tessera`).
        /// Default: the embedded file in --state-dir.
        #[arg(long)]
        store: Option<String>,
        /// With `--store etcds://...`: the CA (PEM) that signed etcd's certificates.
        #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
        etcd_ca: Option<PathBuf>,
        /// With `--store etcds://...`: this server's client certificate (PEM) for etcd.
        #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// With `--store etcds://...`: the client certificate's key (PEM, mode 0600).
        #[arg(long, requires_all = ["etcd_ca", "etcd_cert"])]
        etcd_key: Option<PathBuf>,
        /// Where enforcers and administrators reach the control plane (HTTPS).
        #[arg(long, default_value = server::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// The SPIFFE trust domain of the fleet (fixed when the CA is created).
        #[arg(long, default_value = "tessera.local")]
        trust_domain: String,
        /// A DNS name or IP address enforcers use to reach this server (repeatable; default:
        /// localhost, 127.0.0.1 and the listen address).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Lifetime of enforcer certificates (renewed at about half of it).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lifetime: std::time::Duration,
        /// Trust instance identity documents signed by these provider certificates (PEM).
        #[arg(long)]
        document_trust: Option<PathBuf>,
        /// How old an identity document may be.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        document_max_age: std::time::Duration,
        /// An instance tag carried into the enforcer's scope (repeatable), e.g. `site`.
        #[arg(long = "scope-tag")]
        scope_tags: Vec<String>,
        /// Enrolment attempts per second from one address.
        #[arg(long, default_value_t = 5)]
        enrol_rate: u32,
        /// Write the server's pid to this file once it is serving.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Serve the fleet map's web page (read-only, filters, new edges) on this address,
        /// e.g. 127.0.0.1:15180; never on the enforcers' port.
        #[arg(long)]
        map_listen: Option<std::net::SocketAddr>,
        /// A bearer token file (0600) browsers must present to the map page; required when
        /// --map-listen is not a loopback address.
        #[arg(long)]
        map_token_file: Option<PathBuf>,
    },
    /// One-time join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Every enforcer: scope, addresses, certificate expiry, policy in force, last contact.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke or remove an enforcer.
    Enforcer {
        #[command(subcommand)]
        command: EnforcerCommand,
    },
    /// Instance identity documents, as a cloud provider makes them (for tests and demos).
    Document {
        #[command(subcommand)]
        command: DocumentCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new join token (once) for one enforcer.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// The enforcer's scope, `k=v,k2=v2` (e.g. `site=paris,tenant=acme`).
        #[arg(long, default_value = "")]
        scope: String,
        /// How long the token can be used (once).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum EnforcerCommand {
    /// Every peer drops it within about a second, and it cannot renew.
    Revoke {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Forget a revoked enforcer (its name, or its cloud instance, may enrol again).
    Remove {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum DocumentCommand {
    /// Create a provider key and certificate in DIR (provider.key, provider.pem).
    ProviderInit { dir: PathBuf },
    /// Print a signed identity document for an instance, dated now.
    Make {
        #[arg(long)]
        provider_key: PathBuf,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        account: String,
        #[arg(long)]
        region: String,
        #[arg(long, default_value = "ami-tessera")]
        image: String,
        /// An instance tag, `k=v` (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new cluster CA in DIR (ca.pem, ca.key).
    Init {
        /// Where ca.pem and ca.key (mode 0600) are written.
        #[arg(long)]
        dir: PathBuf,
        /// The SPIFFE trust domain of the cluster.
        #[arg(long, default_value = "tessera.local")]
        trust_domain: String,
    },
    /// Issue an enforcer certificate signed by the CA in --ca-dir.
    Issue {
        /// The CA's directory (`ca init --dir`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The enforcer's name (becomes the certificate's DNS name).
        #[arg(long)]
        name: String,
        /// Extra IP subject-alternative names.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Where `<name>.pem` and `<name>.key` are written.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn init_tracing(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// jemalloc, not glibc's malloc: why, and how it is told to give memory back, in
/// `tessera_enforcer::alloc`.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Dispatches the command line to the command's function.
fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            keep_attached,
            ready_file,
        } => run_daemon(
            &cli.log_format,
            daemon::RunOptions {
                config,
                keep_attached,
                ready_file,
            },
        ),
        Command::Check { config } => check(&cli.log_format, &config),
        Command::OciHook { socket } => {
            let mut state = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(std::io::stdin(), 1 << 20),
                &mut state,
            )?;
            tessera_enforcer::sources::hook::run_hook(&socket, &state)
        }
        Command::Man { out_dir } => man_pages(&out_dir),
        Command::Detach { config } => {
            init_tracing(&cli.log_format);
            let d = tessera_enforcer::detach::detach(&config::Config::load(&config)?)?;
            match d.pin_dir {
                Some(dir) => println!("capture detached ({} removed)", dir.display()),
                None => println!("no capture pinned"),
            }
            if d.handshake_rules {
                println!("handshake-mode rules removed");
            }
            Ok(())
        }
        Command::Server { command } => server_command(&cli.log_format, command),
        Command::Ca { command } => ca_command(command),
        Command::Policy { command } => policy_command(command),
        Command::Identity { command } => identity_command(command),
        Command::Flows {
            apis,
            logs,
            follow,
            json,
            verdict,
            workload,
            since,
            token_file,
        } => {
            let filter = flowstore::FlowFilter {
                workload,
                verdict,
                since,
            };
            let sources =
                client::Sources::new(apis, logs).with_token_file(token_file.as_deref())?;
            client::flows(sources, filter, follow, json)
        }
        Command::Map {
            servers,
            ca,
            admin_token_file,
            apis,
            logs,
            format,
            new_after,
            token_file,
            serve,
        } => {
            if let Some(listen) = serve {
                if servers.is_empty() || !apis.is_empty() || !logs.is_empty() {
                    anyhow::bail!(
                        "--serve shows the fleet's map: it needs --server, without --api or --log"
                    );
                }
                let token = match &token_file {
                    Some(f) => Some(
                        tessera_enforcer::api::read_token_file(f)
                            .map_err(|e| anyhow::anyhow!("--token-file: {e}"))?,
                    ),
                    None => None,
                };
                init_tracing(&cli.log_format);
                return tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?
                    .block_on(fleetview::serve(fleetview::Options {
                        servers,
                        ca,
                        admin_token_file,
                        listen,
                        token,
                        new_after,
                    }));
            }
            let mut map = if servers.is_empty() {
                client::map(
                    client::Sources::new(apis, logs).with_token_file(token_file.as_deref())?,
                )?
            } else {
                if !apis.is_empty() || !logs.is_empty() {
                    anyhow::bail!("--server shows the fleet's map: without --api or --log");
                }
                server::fleet_map(&server::AdminTarget {
                    servers,
                    ca,
                    admin_token_file,
                })?
            };
            if let Some(window) = new_after {
                let n = map::mark_new(&mut map, window.as_millis() as u64);
                eprintln!(
                    "{n} new edges (first seen after the first {})",
                    humantime::format_duration(window)
                );
            }
            show_map(&map, &format)
        }
    }
}

/// `tessera run`: the daemon, on a multi-threaded runtime, until it stops; why it stopped
/// is logged as well as returned.
fn run_daemon(log_format: &str, options: daemon::RunOptions) -> Result<()> {
    init_tracing(log_format);
    if let Err(e) = tessera_enforcer::alloc::purge_in_background() {
        tracing::warn!(error = %e, "jemalloc's background purging is off: unused memory returns only while allocating");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(daemon::run(options));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "enforcer stopped");
    }
    result
}

/// `tessera man DIR`: the manual pages, made from this command line (help texts as written
/// here), one per command.
fn man_pages(out_dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    clap_mangen::generate_to(Cli::command(), out_dir)
        .with_context(|| format!("cannot write manual pages in {}", out_dir.display()))
}

/// `tessera check`: loads (and so validates) a configuration file.
fn check(log_format: &str, config: &Path) -> Result<()> {
    // Warnings (an old key, say) are part of the check.
    init_tracing(log_format);
    let c = config::Config::load(config)?;
    let containers = c
        .containers
        .as_ref()
        .map(|k| format!(", containers under {}", k.cgroup.display()))
        .unwrap_or_default();
    println!(
        "{}: ok ({} workloads, {} peers{containers})",
        config.display(),
        c.workloads.len(),
        c.peers.len()
    );
    Ok(())
}

/// `tessera server ...`: the control plane and its administration.
fn server_command(log_format: &str, command: ServerCommand) -> Result<()> {
    match command {
        ServerCommand::Run {
            state_dir,
            store,
            etcd_ca,
            etcd_cert,
            etcd_key,
            listen,
            trust_domain,
            names,
            lifetime,
            document_trust,
            document_max_age,
            scope_tags,
            enrol_rate,
            ready_file,
            map_listen,
            map_token_file,
        } => {
            init_tracing(log_format);
            if let Err(e) = tessera_enforcer::alloc::purge_in_background() {
                tracing::warn!(error = %e, "jemalloc's background purging is off: unused memory returns only while allocating");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(server::run(server::RunOptions {
                state_dir,
                store,
                listen,
                trust_domain,
                names,
                lifetime,
                document_trust,
                document_max_age,
                scope_tags,
                enrol_per_source: enrol_rate,
                ready_file,
                map_listen,
                map_token_file,
                etcd_tls: match (etcd_ca, etcd_cert, etcd_key) {
                    (Some(ca), Some(cert), Some(key)) => Some([ca, cert, key]),
                    _ => None,
                },
            }));
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "control plane stopped");
            }
            result
        }
        ServerCommand::Token {
            command: TokenCommand::Create { admin, scope, ttl },
        } => {
            println!("{}", server::token_create(&admin.target(), &scope, ttl)?);
            Ok(())
        }
        ServerCommand::Status { admin, json } => {
            print!("{}", server::status(&admin.target(), json)?);
            Ok(())
        }
        ServerCommand::Enforcer { command } => match command {
            EnforcerCommand::Revoke { name, admin } => {
                server::enforcer(&admin.target(), &name, false)?;
                println!("{name}: revoked");
                Ok(())
            }
            EnforcerCommand::Remove { name, admin } => {
                server::enforcer(&admin.target(), &name, true)?;
                println!("{name}: removed");
                Ok(())
            }
        },
        ServerCommand::Document { command } => match command {
            DocumentCommand::ProviderInit { dir } => {
                let (key, cert) = server::provider_init(&dir)?;
                println!("{}\n{}", key.display(), cert.display());
                Ok(())
            }
            DocumentCommand::Make {
                provider_key,
                instance,
                account,
                region,
                image,
                tags,
            } => {
                println!(
                    "{}",
                    server::document_make(
                        &provider_key,
                        &instance,
                        &account,
                        &region,
                        &image,
                        &tags
                    )?
                );
                Ok(())
            }
        },
    }
}

/// `tessera ca init|issue`: the cluster certificate authority.
fn ca_command(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let path = ca::init(&dir, &trust_domain)?;
            println!("created {}", path.display());
        }
        CaCommand::Issue {
            ca_dir,
            name,
            ips,
            out_dir,
        } => {
            let (cert, key) = ca::issue(&ca_dir, &name, &ips, &out_dir)?;
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

/// `tessera policy check|explain`.
fn policy_command(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check { file } => policy_check(&file),
        PolicyCommand::Suggest {
            group_by,
            since,
            admin,
        } => {
            let s = server::policy_suggest(&admin.target(), group_by, since)?;
            for why in &s.skipped {
                eprintln!("left out: {why}");
            }
            eprintln!("{} rules from {} edges", s.rules, s.edges);
            print!("{}", s.text);
            Ok(())
        }
        PolicyCommand::Apply { file, admin } => {
            let version = server::policy_apply(&admin.target(), &file)?;
            println!("{}: applied as version {version}", file.display());
            Ok(())
        }
        PolicyCommand::Explain {
            policy,
            from,
            from_addr,
            to,
            to_addr,
            port,
        } => policy_explain(&policy, &from, from_addr, &to, to_addr, port),
    }
}

/// `tessera policy check`: every error of the file on stderr, and a failure if any.
fn policy_check(file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match tessera_policy::parse::parse(&file.display().to_string(), &text) {
        Ok(p) => {
            println!("{}: ok ({} rules)", file.display(), p.rules.len());
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            anyhow::bail!("{}: {} error(s)", file.display(), e.errors.len())
        }
    }
}

/// `tessera policy explain`: the decision for one connection and the rule behind it; each
/// end is given as labels (`k=v,...`, may be empty) and an optional address.
fn policy_explain(
    policy: &Path,
    from: &str,
    from_addr: Option<IpAddr>,
    to: &str,
    to_addr: Option<IpAddr>,
    port: u16,
) -> Result<()> {
    let text = std::fs::read_to_string(policy)
        .with_context(|| format!("cannot read {}", policy.display()))?;
    let parsed = tessera_policy::parse::parse(&policy.display().to_string(), &text)?;
    let lines = tessera_policy::compile::rule_lines(&parsed);
    let compiled = tessera_policy::CompiledPolicy::new(parsed);
    let (src, dst) = (
        parse_labels(from).context("--from")?,
        parse_labels(to).context("--to")?,
    );
    let s = tessera_policy::Subject {
        labels: src.as_ref(),
        addr: from_addr,
    };
    let t = tessera_policy::Subject {
        labels: dst.as_ref(),
        addr: to_addr,
    };
    let d = compiled.decide(&s, &t, port, &tessera_policy::compile::no_dns);
    let at = |r: &str| {
        lines
            .get(r)
            .map(|l| format!(" ({}:{l})", policy.display()))
            .unwrap_or_default()
    };
    println!("decision: {}", if d.allowed() { "allow" } else { "deny" });
    match &d.rule {
        Some(r) => println!("rule:     {r}{}", at(r)),
        None => println!("rule:     none matched: default deny"),
    }
    if let Some(o) = &d.observed_deny {
        println!(
            "observe:  rule {o}{} would deny (observe mode: recorded only)",
            at(o)
        );
    }
    println!("reason:   {}", d.reason());
    Ok(())
}

/// Labels given on the command line (`k=v,k2=v2`); empty: none.
fn parse_labels(s: &str) -> Result<Option<tessera_policy::Labels>> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(
            tessera_policy::Labels::parse(s).map_err(anyhow::Error::msg)?,
        ))
    }
}

/// `tessera identity show`: the enrolled workloads' identities, as text or JSON.
fn identity_command(command: IdentityCommand) -> Result<()> {
    let IdentityCommand::Show { config, json } = command;
    let c = config::Config::load(&config)?;
    let shown = identity_show::collect(&c);
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print!("{}", identity_show::text(&shown));
    }
    Ok(())
}

/// `tessera map`: the merged connectivity map as a table, JSON or Graphviz dot.
fn show_map(map: &map::Map, format: &str) -> Result<()> {
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(map)?),
        "dot" => print!("{}", map::dot(map)),
        _ => print!("{}", flowlog::table(map)),
    }
    Ok(())
}
