//! `tessera detach`: takes off the host the capture a stopped enforcer left in force.
//!
//! Under systemd the enforcer always exits with `--keep-attached` (so capture holds across
//! restarts and upgrades, failing closed meanwhile). Taking Tessera off a host for good (the
//! package's removal, or an administrator) needs the other half: with the enforcer stopped,
//! unpin its links (which detaches the programs), remove its pinned maps, and in handshake
//! mode remove its netfilter rules. A running enforcer is never pulled from under: while
//! its flow map database is locked (every running enforcer holds it) or, in tunnel mode, its
//! outbound port is bound, detach refuses.
use std::{os::fd::AsRawFd, path::PathBuf};

use anyhow::{Result, bail};

use crate::config::{Config, DataPathMode};

/// What [`detach`] took off.
#[derive(Debug)]
pub struct Detached {
    /// The pin directory, if capture was pinned there.
    pub pin_dir: Option<PathBuf>,
    pub handshake_rules: bool,
}

/// Detaches the capture the enforcer of `config` left pinned (and its handshake rules).
pub fn detach(config: &Config) -> Result<Detached> {
    const STOP: &str = "stop the enforcer first (`systemctl stop tessera-enforcer`)";
    // The flow store's lock (redb's flock): held by the enforcer of this configuration for
    // as long as it runs, whatever its mode.
    let db = config.map_db();
    if let Ok(file) = std::fs::File::open(&db) {
        // SAFETY: flock on a descriptor this function owns; released when `file` closes.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            bail!("{} is locked: an enforcer runs: {STOP}", db.display());
        }
    }
    if config.mode() == DataPathMode::Tunnel {
        let port = config.listen.outbound_port;
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            bail!("127.0.0.1:{port} (listen.outbound_port) is in use ({e}): {STOP}");
        }
    }
    let pin_dir = crate::capture::remove_pinned(&config.pin_dir())?;
    let handshake_rules = config.mode() == DataPathMode::Handshake;
    if handshake_rules {
        crate::handshake::remove_rules();
    }
    Ok(Detached {
        pin_dir,
        handshake_rules,
    })
}
