//! `tessera`: the enforcer daemon and its command-line tools. This file is only the command
//! line (arguments and dispatch); what the commands do is in the `tessera_enforcer` library.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use tessera_enforcer::{ca, client, config, daemon, flowlog, flowstore, identity_show, map};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Transparent, identity-aware network enforcer"
)]
struct Cli {
    /// Log format of the daemon.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the enforcer: capture enrolled workloads' connections and carry them through tunnels.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// On exit, leave the eBPF programs attached and pinned: captured connections then
        /// fail closed until an enforcer starts again.
        #[arg(long)]
        keep_attached: bool,
        /// Write the daemon's pid to this file once it is serving.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file without running it.
    Check { config: PathBuf },
    /// The cluster certificate authority.
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
    /// The connectivity map of one or more enforcers, merged into one.
    Map {
        #[arg(long = "api")]
        apis: Vec<std::net::SocketAddr>,
        #[arg(long = "log")]
        logs: Vec<PathBuf>,
        #[arg(long, default_value = "table", value_parser = ["table", "json", "dot"])]
        format: String,
        /// The APIs' bearer token (`[flows] api_token_file`; mode 0600, yours).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Print each enrolled workload's identity (SPIFFE name and labels, declared and derived)
    /// and, for each of its processes now, the labels its connections add: what policy
    /// matches on.
    Show {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file: every error with file, line and column; non-zero exit on error.
    Check { file: PathBuf },
    /// Print the decision for a connection and the rule that led to it.
    Explain {
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
        #[arg(long)]
        to_addr: Option<IpAddr>,
        #[arg(long)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new cluster CA in DIR (ca.pem, ca.key).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "tessera.local")]
        trust_domain: String,
    },
    /// Issue an enforcer certificate signed by the CA in --ca-dir.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The enforcer's name (becomes the certificate's DNS name).
        #[arg(long)]
        name: String,
        /// Extra IP subject-alternative names.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
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
            apis,
            logs,
            format,
            token_file,
        } => show_map(
            client::Sources::new(apis, logs).with_token_file(token_file.as_deref())?,
            &format,
        ),
    }
}

/// `tessera run`: the daemon, on a multi-threaded runtime, until it stops; why it stopped
/// is logged as well as returned.
fn run_daemon(log_format: &str, options: daemon::RunOptions) -> Result<()> {
    init_tracing(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(daemon::run(options));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "enforcer stopped");
    }
    result
}

/// `tessera check`: loads (and so validates) a configuration file.
fn check(log_format: &str, config: &Path) -> Result<()> {
    // Warnings (an old key, say) are part of the check.
    init_tracing(log_format);
    let c = config::Config::load(config)?;
    println!(
        "{}: ok ({} workloads, {} peers)",
        config.display(),
        c.workloads.len(),
        c.peers.len()
    );
    Ok(())
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
fn show_map(sources: client::Sources, format: &str) -> Result<()> {
    let map = client::map(sources)?;
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(&map)?),
        "dot" => print!("{}", map::dot(&map)),
        _ => print!("{}", flowlog::table(&map)),
    }
    Ok(())
}
