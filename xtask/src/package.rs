//! `cargo xtask package`: the Debian package of a host install, built with Debian's own
//! `dpkg-deb` (no tool to fetch): the release `tessera` binary (with its embedded eBPF
//! object), the systemd units and default configuration of `deploy/`, the maintainer
//! scripts, the manual pages (made by `tessera man` from the command line itself) and the
//! documentation. Written to `target/debian/tessera_<version>_<arch>.deb`.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::build::{cargo, target_dir, workspace};

/// Builds the release binary and the package; returns the package's path.
pub fn run() -> Result<PathBuf> {
    cargo(&["build", "--release", "-p", "tessera-enforcer"])?;
    let deb = assemble(&target_dir().join("release/tessera"))?;
    eprintln!("package: {}", deb.display());
    Ok(deb)
}

fn out(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().expect("a file in a directory"))?;
    fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The package's `Depends` from the libraries the binary needs (`readelf -d`): libc6 at
/// the newest glibc symbol version it uses, libgcc-s1 for the unwinder.
fn depends(bin: &Path) -> Result<String> {
    let dynamic = out(Command::new("readelf").arg("-dW").arg(bin))?;
    let symbols = out(Command::new("readelf").arg("--dyn-syms").arg("-W").arg(bin))?;
    let glibc = symbols
        .split(|c: char| c.is_whitespace() || c == '@')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Vec<u32> = v
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some(parts)
        })
        .max()
        .context("the binary uses no versioned glibc symbol")?;
    let glibc = glibc
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let mut deps = vec![format!("libc6 (>= {glibc})")];
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let lib = line
            .rsplit('[')
            .next()
            .and_then(|l| l.strip_suffix(']'))
            .unwrap_or(line);
        match lib {
            "libc.so.6"
            | "libm.so.6"
            | "libpthread.so.0"
            | "libdl.so.2"
            | "librt.so.1"
            | "ld-linux-x86-64.so.2"
            | "ld-linux-aarch64.so.1" => {}
            "libgcc_s.so.1" => deps.push("libgcc-s1".into()),
            other => bail!("the binary needs {other}: add its package to the Depends"),
        }
    }
    Ok(deps.join(", "))
}

/// Installed size in KiB (the control file's `Installed-Size`).
fn size_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            size_kib(&e.path())? * 1024
        } else {
            m.len()
        };
    }
    Ok(total.div_ceil(1024))
}

/// Every regular file under `root/dir`, as paths relative to `root`.
fn files(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(root.join(dir))? {
        let e = e?;
        let rel = dir.join(e.file_name());
        if e.file_type()?.is_dir() {
            files(root, &rel, found)?;
        } else {
            found.push(rel);
        }
    }
    Ok(())
}

/// Lays out the package from `bin` and builds it with `dpkg-deb`.
pub fn assemble(bin: &Path) -> Result<PathBuf> {
    let ws = workspace();
    let deploy = ws.join("deploy");
    let version = env!("CARGO_PKG_VERSION");
    let arch = out(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let debian = target_dir().join("debian");
    let root = debian.join(format!("tessera_{version}_{arch}"));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let at = |p: &str| root.join(p);
    // The binary, without its debug sections (the line tables stay in target/).
    fs::create_dir_all(at("usr/bin"))?;
    out(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(at("usr/bin/tessera")))?;
    fs::set_permissions(at("usr/bin/tessera"), fs::Permissions::from_mode(0o755))?;
    // Manual pages from the command line itself.
    let man = at("usr/share/man/man1");
    out(Command::new(at("usr/bin/tessera")).arg("man").arg(&man))?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        out(Command::new("gzip").args(["-9n"]).arg(&page))?;
    }
    for unit in ["tessera-enforcer.service", "tessera-server.service"] {
        copy(
            &deploy.join("systemd").join(unit),
            &at(&format!("lib/systemd/system/{unit}")),
            0o644,
        )?;
    }
    copy(
        &deploy.join("debian/sysusers.conf"),
        &at("usr/lib/sysusers.d/tessera.conf"),
        0o644,
    )?;
    let conffiles = ["etc/tessera/enforcer.toml", "etc/tessera/server.env"];
    for c in conffiles {
        let name = Path::new(c).file_name().expect("a file");
        copy(&deploy.join("etc").join(name), &at(c), 0o640)?;
    }
    let doc = at("usr/share/doc/tessera");
    for (from, to) in [
        ("README.md", "README.md"),
        ("docs/install-host.md", "install-host.md"),
        ("docs/control-plane.md", "control-plane.md"),
        ("docs/threat-model.md", "threat-model.md"),
    ] {
        copy(&ws.join(from), &doc.join(to), 0o644)?;
    }
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: tessera\n\nFiles: *\nLicense: Apache-2.0\n \
         On Debian systems the full text of the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    // The control area.
    let control_dir = at("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &deploy.join("debian").join(script),
            &control_dir.join(script),
            0o755,
        )?;
    }
    fs::write(
        control_dir.join("conffiles"),
        conffiles.map(|c| format!("/{c}\n")).concat(),
    )?;
    let mut payload = Vec::new();
    for top in ["usr", "lib", "etc"] {
        files(&root, Path::new(top), &mut payload)?;
    }
    payload.sort();
    let mut md5sums = String::new();
    for f in &payload {
        let sum = out(Command::new("md5sum").arg(f).current_dir(&root))?;
        md5sums.push_str(&sum);
    }
    fs::write(control_dir.join("md5sums"), md5sums)?;
    let control = fs::read_to_string(deploy.join("debian/control"))?
        .replace("@VERSION@", version)
        .replace("@ARCH@", &arch)
        .replace("@DEPENDS@", &depends(bin)?)
        .replace("@SIZE@", &size_kib(&root)?.to_string());
    fs::write(control_dir.join("control"), control)?;
    let deb = debian.join(format!("tessera_{version}_{arch}.deb"));
    out(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb))?;
    Ok(deb)
}
