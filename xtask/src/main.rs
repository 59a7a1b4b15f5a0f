//! `cargo xtask`: Tessera's project tasks.
//!
//! * `setup`  installs what a fresh machine lacks (idempotent).
//! * `test`   setup, build, and every test of the workspace (unit and end-to-end).
//! * `package` the Debian package of a host install (`target/debian/*.deb`).
//! * `demo`   setup, build, then real workloads on test hosts behind Tessera; prints the map.
//! * `image`  the release binary in a container image (buildah), for deploy/kubernetes/.
//! * `bench`  direct vs through-Tessera throughput, connection rate, latency, memory; the
//!   control plane under a simulated fleet (`--only fleet`); `--peers` adds ztunnel and
//!   stunnel side by side (never in CI).
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod demo;
mod fleet;
mod image;
mod load;
mod package;
mod peers;
mod setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain parts, bpf-linker and the Debian packages the project needs.
    Setup,
    /// Setup, build, and run every test (unit and end-to-end; end-to-end needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build the release binary and the Debian package of a host install
    /// (target/debian/tessera_<version>_<arch>.deb).
    Package,
    /// Setup, build, and run the demo: three test hosts, real programs, the map.
    Demo,
    /// Build the container image `localhost/tessera:<version>` (buildah, from scratch)
    /// with the release binary, for deploy/kubernetes/.
    Image {
        /// Use this `tessera` binary instead of building the release one.
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Tag it so instead of `localhost/tessera:<version>`.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Measure direct vs through-Tessera performance on test hosts.
    Bench {
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Shorter runs (for a quick look; figures are noisier).
        #[arg(long)]
        quick: bool,
        /// Run only these sections (repeatable); default: all.
        #[arg(long, value_enum)]
        only: Vec<bench::Section>,
        /// Record CPU profiles (perf record -g) of both enforcers during each mode's
        /// connection-rate CPU run (and the warm fast path's repeats: `.fast`), into this
        /// file with the section name as extension.
        #[arg(long)]
        perf: Option<PathBuf>,
        /// Simulated enforcers in the fleet section (`--only fleet`; it also runs 100).
        #[arg(long, default_value_t = 1000)]
        fleet_n: usize,
        /// Also run the side-by-side section (`--only peers` runs it alone): direct,
        /// ztunnel in HBONE mode, stunnel4 (TLS 1.3) and Tessera's two modes on test hosts,
        /// 3 alternating rounds, median and min-max, CPU steal per round. Never in CI.
        /// ztunnel is built once from ../shared/peers/ into $XDG_CACHE_HOME/tessera-peers
        /// (or ~/.cache/tessera-peers) unless --ztunnel is given.
        #[arg(long)]
        peers: bool,
        /// The ztunnel binary for --peers (instead of the cached build).
        #[arg(long)]
        ztunnel: Option<PathBuf>,
    },
    /// Traffic programs the bench runs inside test hosts (not for direct use).
    #[command(hide = true)]
    Load {
        #[command(subcommand)]
        command: load::LoadCommand,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test { args } => {
            setup::run()?;
            build::test(&args)
        }
        Command::Package => {
            setup::run()?;
            package::run().map(drop)
        }
        Command::Demo => {
            setup::run()?;
            let bin = build::release()?;
            demo::run(&bin)
        }
        Command::Image { bin, tag } => {
            setup::run()?;
            image::run(bin.as_deref(), tag.as_deref())
        }
        Command::Bench {
            json,
            quick,
            only,
            perf,
            fleet_n,
            peers,
            ztunnel,
        } => {
            setup::run()?;
            // Found (or built, once) before anything else starts.
            let ztunnel = if peers || only.contains(&bench::Section::Peers) {
                Some(peers::ztunnel_binary(ztunnel.as_deref())?)
            } else {
                None
            };
            let bin = build::release()?;
            bench::run(
                &bin,
                &bench::Options {
                    json: json.as_deref(),
                    quick,
                    only,
                    perf: perf.as_deref(),
                    fleet_n,
                    ztunnel: ztunnel.as_deref(),
                },
            )
        }
        Command::Load { command } => load::run(command),
    }
}
