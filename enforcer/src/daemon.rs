//! `tessera run`: load the configuration, build the enforcer (`app`), serve until a
//! signal, and exit in order.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{app, config::Config};

pub struct RunOptions {
    pub config: PathBuf,
    pub keep_attached: bool,
    pub ready_file: Option<PathBuf>,
}

/// Each proxied connection holds a descriptor at each enforcer (its streams share a few
/// tunnels), two for one to or from a peer without an enforcer, so the default limit would
/// cap an enforcer far below the connections a host makes.
pub(crate) fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 1 << 20;
    if setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < WANT
    {
        // Without CAP_SYS_RESOURCE the hard limit cannot be raised.
        tracing::warn!(
            limit = soft,
            max_tunnelled_connections = soft.saturating_sub(200),
            "open file limit could not be raised: each tunnelled connection holds a descriptor (two without a peer enforcer)"
        );
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    raise_fd_limit();
    let mut config = Config::load(&opts.config)?;
    // Under a control plane: its state (cached, or from enrolling now) as configuration.
    let agent = crate::control::bootstrap(&mut config).await?;
    config
        .revalidate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.config.display()))?;
    let mut running = app::build(&config).await?;
    if let Some(agent) = agent {
        running.follow_control(agent);
    }
    if let Some(ready) = &opts.ready_file {
        std::fs::write(ready, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", ready.display()))?;
    }
    let result = running.wait().await;
    running.shutdown(opts.keep_attached);
    result
}
