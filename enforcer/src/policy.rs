//! The policy in force: loading it, the workloads' identities, and reloading it when the
//! file changes or on SIGHUP. A new policy that does not parse is reported (every error with
//! its line and column) and the previous one stays in force.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tessera_policy::CompiledPolicy;
use tessera_proxy::{local::LocalWorkload, registry::ConnectionRegistry};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, Workload};

/// Used when no policy file is configured: enrolled workloads may reach each other.
const WITHOUT_POLICY: &str = "rules:\n  - name: any-workload-to-any-workload\n    action: allow\n    from: [{labels: []}]\n    to: [{labels: []}]\n";

/// A workload's identity: its declared labels plus the ones the enforcer derives, under the
/// reserved `tessera.io/` prefix (see `attest`).
pub fn identity(config: &Config, w: &Workload) -> LocalWorkload {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    LocalWorkload {
        name: w.name.clone(),
        identity: crate::attest::workload_identity(
            &config.identity.trust_domain,
            &config.name,
            &host,
            &w.name,
            &w.cgroup,
            w.labels.clone(),
        ),
        observe: w.observe,
    }
}

pub fn load(file: Option<&Path>) -> Result<Arc<CompiledPolicy>> {
    match file {
        None => {
            Ok(tessera_policy::load("<built-in>", WITHOUT_POLICY).expect("built-in policy parses"))
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read policy {}", path.display()))?;
            Ok(tessera_policy::load(&path.display().to_string(), &text)?)
        }
    }
}

fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// Reloads `path` into `registry` whenever its modification time or size changes (checked
/// twice a second: editors that replace the file are seen too) and on SIGHUP.
pub async fn watch(
    path: PathBuf,
    registry: Arc<ConnectionRegistry>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = modified(&path);
                if now == seen { continue; }
                seen = now;
                "file changed"
            }
        };
        match load(Some(&path)) {
            Ok(policy) => {
                let rules = policy.rule_count();
                let closed = registry.apply(policy);
                metrics.policy_reload(true);
                tracing::info!(file = %path.display(), trigger = why, rules, closed_connections = closed, "policy reloaded");
            }
            Err(e) => {
                metrics.policy_reload(false);
                tracing::error!(
                    file = %path.display(),
                    trigger = why,
                    error = format!("{e:#}"),
                    "policy not reloaded: the previous policy stays in force"
                )
            }
        }
    }
}
