//! Building the enforcer and running the test suite.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo(args: &[&str]) -> Result<()> {
    let s = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace())
        .status()
        .context("cannot run cargo")?;
    if !s.success() {
        bail!("cargo {} failed ({s})", args.join(" "));
    }
    Ok(())
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds the release `tessera` binary (with its embedded eBPF object) and returns its path.
pub fn release() -> Result<PathBuf> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "tessera-enforcer",
        "-p",
        "xtask",
    ])?;
    Ok(target_dir().join("release/tessera"))
}

/// Every test of the workspace, against a freshly built `tessera`.
pub fn test(extra: &[String]) -> Result<()> {
    cargo(&["build", "-p", "tessera-enforcer"])?;
    let bin = target_dir().join("debug/tessera");
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let s = Command::new(env!("CARGO"))
        .args(&args)
        .env("TESSERA_BIN", &bin)
        .current_dir(workspace())
        .status()
        .context("cannot run cargo test")?;
    if !s.success() {
        bail!("tests failed");
    }
    Ok(())
}
