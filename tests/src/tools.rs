//! The traffic and attack programs (tests/tools/*.py), written next to a test's files.
use std::path::{Path, PathBuf};

use anyhow::Result;

const TOOL: &str = include_str!("../tools/tessera_tool.py");

/// Writes the tool into `dir` and returns its path.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("tessera_tool.py");
    std::fs::write(&path, TOOL)?;
    Ok(path)
}

const ATTACK: &str = include_str!("../tools/handshake_attack.py");

/// Writes the handshake adversary (scapy) into `dir` and returns its path.
pub fn install_attack(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("handshake_attack.py");
    std::fs::write(&path, ATTACK)?;
    Ok(path)
}

const FLOOD: &str = include_str!("../tools/flood.py");

/// Writes the spoofed handshake flood (scapy, a raw socket) into `dir` and returns its path.
pub fn install_flood(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("flood.py");
    std::fs::write(&path, FLOOD)?;
    Ok(path)
}
