//! The system programs handshake mode runs (`iptables`, `ip6tables`, `ss`), by absolute
//! path: found once, at start-up, in a fixed list of system directories and never through
//! `$PATH`, which whoever started the daemon could have pointed anywhere (a `$PATH` holding
//! a directory of theirs would run their `iptables` as root). A program that is missing, or
//! that someone other than root (or this daemon's user) could replace, is a start-up error
//! naming it.
use std::{
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context, bail};
use thiserror::Error;

/// Where the programs are looked for, in this order. Nothing else: not `$PATH`, not
/// `/usr/local` (a place for whatever an administrator installs by hand).
pub const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The whole environment the programs run with: nothing of the daemon's own (with
/// `XTABLES_LIBDIR`, whoever started the daemon would choose the libraries iptables loads),
/// only a `PATH` of the system directories (for what they run in turn) and the C locale.
pub const ENV: [(&str, &str); 2] = [("PATH", "/usr/sbin:/sbin:/usr/bin:/bin"), ("LC_ALL", "C")];

/// The programs handshake mode runs, by absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub iptables: PathBuf,
    pub ip6tables: PathBuf,
    pub ss: PathBuf,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ToolError {
    #[error(
        "{name}: not found in {dirs} (it is never looked for in $PATH); install it (iptables / iproute2)"
    )]
    Missing { name: String, dirs: String },
    #[error(
        "{name}: {path} can be replaced by others than root ({why}); refusing to run it as root"
    )]
    Unsafe {
        name: String,
        path: PathBuf,
        why: String,
    },
}

static RESOLVED: OnceLock<Tools> = OnceLock::new();

/// Runs a program found by [`find`] with `args` (and `stdin`, if any) in the clean
/// environment [`ENV`], and returns what it printed. A failure is an error naming the
/// command and carrying what it said.
pub fn run_program(tool: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let command = || format!("{} {}", tool.display(), args.join(" "));
    let mut child = Command::new(tool)
        .env_clear()
        .envs(ENV)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", tool.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("{}: cannot write its input", command()))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("{}: cannot wait for it", command()))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            command(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The programs, resolved on the first call (start-up) and the same ones ever after.
pub fn tools() -> Result<&'static Tools, ToolError> {
    if let Some(t) = RESOLVED.get() {
        return Ok(t);
    }
    let dirs = SYSTEM_DIRS.map(Path::new);
    let found = Tools::resolve_in(&dirs)?;
    Ok(RESOLVED.get_or_init(|| found))
}

impl Tools {
    /// The programs in the first of `dirs` that holds each.
    pub fn resolve_in(dirs: &[&Path]) -> Result<Self, ToolError> {
        Ok(Self {
            iptables: find("iptables", dirs)?,
            ip6tables: find("ip6tables", dirs)?,
            ss: find("ss", dirs)?,
        })
    }
}

/// `name` in the first of `dirs` holding it as an executable file (symbolic links followed:
/// iptables is one, through /etc/alternatives). The path returned is the one found, not the
/// link's target: multi-call programs (iptables-nft) tell what to be by the name they are
/// run as. The file found must be one only root (or this process's user) can change, in a
/// directory only they can change; else it is an error, not a reason to look further.
pub fn find(name: &str, dirs: &[&Path]) -> Result<PathBuf, ToolError> {
    for dir in dirs {
        let path = dir.join(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        let unsafe_because = |why: String| ToolError::Unsafe {
            name: name.into(),
            path: path.clone(),
            why,
        };
        if let Some(why) = replaceable(&meta, "the file") {
            return Err(unsafe_because(why));
        }
        if let Some(why) = std::fs::metadata(dir)
            .ok()
            .and_then(|m| replaceable(&m, "its directory"))
        {
            return Err(unsafe_because(why));
        }
        return Ok(path);
    }
    Err(ToolError::Missing {
        name: name.into(),
        dirs: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Why others than root and us could change what `meta` describes, if they could.
fn replaceable(meta: &std::fs::Metadata, what: &str) -> Option<String> {
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Some(format!("{what} is owned by uid {}", meta.uid()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Some(format!(
            "{what} is writable by its group or by everyone (mode {:o})",
            mode & 0o7777
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn programs_are_found_in_the_listed_directories_only_in_their_order() {
        let (first, second, elsewhere) = (dir(), dir(), dir());
        program(second.path(), "iptables", 0o755);
        program(second.path(), "ip6tables", 0o755);
        program(first.path(), "ip6tables", 0o755);
        program(second.path(), "ss", 0o755);
        // Elsewhere (on a $PATH a hostile environment set, say) but not listed: never used.
        program(elsewhere.path(), "ss", 0o755);
        let t = Tools::resolve_in(&[first.path(), second.path()]).unwrap();
        assert_eq!(t.iptables, second.path().join("iptables"));
        // The first directory holding it wins.
        assert_eq!(t.ip6tables, first.path().join("ip6tables"));
        assert_eq!(t.ss, second.path().join("ss"));
        assert!(t.ss.is_absolute());
        // Not executable, or a directory of that name: not the program.
        std::fs::create_dir(first.path().join("ss")).unwrap();
        program(first.path(), "iptables", 0o644);
        let t = Tools::resolve_in(&[first.path(), second.path()]).unwrap();
        assert_eq!(t.iptables, second.path().join("iptables"));
        assert_eq!(t.ss, second.path().join("ss"));
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it_and_where_it_was_looked_for() {
        let d = dir();
        program(d.path(), "iptables", 0o755);
        program(d.path(), "ip6tables", 0o755);
        let e = Tools::resolve_in(&[d.path()]).unwrap_err();
        assert_eq!(
            e,
            ToolError::Missing {
                name: "ss".into(),
                dirs: d.path().display().to_string()
            }
        );
        let m = e.to_string();
        assert!(
            m.starts_with("ss: not found in ") && m.contains("$PATH"),
            "{m}"
        );
    }

    #[test]
    fn a_program_others_can_replace_is_refused_not_skipped() {
        let (d, later) = (dir(), dir());
        program(d.path(), "ss", 0o757);
        program(later.path(), "ss", 0o755);
        let e = find("ss", &[d.path(), later.path()]).unwrap_err();
        assert!(
            matches!(&e, ToolError::Unsafe { path, .. } if *path == d.path().join("ss")),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("writable by its group or by everyone"),
            "{e}"
        );
        // A directory anyone can write to: anyone could swap the program.
        program(d.path(), "ss", 0o755);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = find("ss", &[d.path()]).unwrap_err();
        assert!(e.to_string().contains("its directory is writable"), "{e}");
    }

    #[test]
    fn the_system_directories_are_absolute_and_hold_the_real_programs() {
        assert!(SYSTEM_DIRS.iter().all(|d| Path::new(d).is_absolute()));
        assert_eq!(ENV[0], ("PATH", SYSTEM_DIRS.join(":").as_str()));
        // Wherever this runs with iproute2 installed, ss is found outside $PATH's say.
        if let Ok(ss) = find("ss", &SYSTEM_DIRS.map(Path::new)) {
            assert!(ss.is_absolute(), "{}", ss.display());
        }
    }
}
