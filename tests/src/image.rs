//! Tessera's container image, as `cargo xtask image` builds it and the image test checks it:
//! from scratch, with the `tessera` binary, the shared libraries it links (as `ldd` lists
//! them, from the build machine's Debian), and busybox from Debian's `busybox-static` for
//! the Kubernetes start script (`deploy/kubernetes/enforcer-config.yaml`: `sh`, `sed`,
//! `awk`, `tr`). No registry is involved: buildah commits the root file system it is given.
use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The image repository the manifests name (`localhost/tessera:<version>`).
pub const REPOSITORY: &str = "localhost/tessera";

/// The image `cargo xtask image` tags: `localhost/tessera:<workspace version>`.
pub fn default_tag() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Where Debian's `busybox-static` installs its one binary.
const BUSYBOX: &str = "/bin/busybox";

/// The busybox applets the start script uses.
const APPLETS: &[&str] = &["sh", "sed", "awk", "tr", "cat", "mkdir", "printf", "head"];

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shared objects `bin` loads (absolute paths, the dynamic loader included).
pub fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(bin))?;
    let mut libs: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect();
    libs.sort();
    libs.dedup();
    if libs.is_empty() {
        bail!("ldd {} lists no library: {out}", bin.display());
    }
    Ok(libs)
}

/// Copies `from` to `root` + `at` (following symlinks: the image holds the files).
fn install(root: &Path, from: &Path, at: &Path, mode: u32) -> Result<()> {
    let to = root.join(at.strip_prefix("/").unwrap_or(at));
    fs::create_dir_all(to.parent().expect("absolute"))?;
    fs::copy(from, &to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The image's root file system, assembled in `rootfs` (emptied first).
pub fn assemble(bin: &Path, rootfs: &Path) -> Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs)?;
    }
    fs::create_dir_all(rootfs)?;
    install(rootfs, bin, Path::new("/usr/bin/tessera"), 0o755)?;
    // The release profile keeps debug info (for perf): not in the image (178 MB → 32 MB).
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(rootfs.join("usr/bin/tessera")))?;
    for lib in shared_libraries(bin)? {
        install(rootfs, &lib, &lib, 0o755)?;
    }
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing: install Debian's busybox-static (`cargo xtask setup`)");
    }
    install(rootfs, Path::new(BUSYBOX), Path::new(BUSYBOX), 0o755)?;
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    for (dir, mode) in [
        ("tmp", 0o1777),
        ("run", 0o755),
        ("etc/tessera", 0o755),
        ("var/lib/tessera", 0o700),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
    ] {
        let d = rootfs.join(dir);
        fs::create_dir_all(&d)?;
        fs::set_permissions(&d, fs::Permissions::from_mode(mode))?;
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\ntessera:x:65532:65532:tessera:/var/lib/tessera:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\ntessera:x:65532:\n")?;
    Ok(())
}

/// Builds the image `tag` from `bin` with buildah (from scratch), working in `work`.
pub fn build(bin: &Path, tag: &str, work: &Path) -> Result<()> {
    let rootfs = work.join("rootfs");
    assemble(bin, &rootfs)?;
    let ctr = run(Command::new("buildah").args(["from", "scratch"]))?
        .trim()
        .to_owned();
    let result = (|| {
        run(Command::new("buildah")
            .args(["copy", "--quiet", &ctr])
            .arg(format!("{}/", rootfs.display()))
            .arg("/"))?;
        run(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/usr/bin/tessera"]"#,
            "--cmd",
            "--help",
            "--workingdir",
            "/",
            "--label",
            &format!(
                "org.opencontainers.image.version={}",
                env!("CARGO_PKG_VERSION")
            ),
            "--label",
            "org.opencontainers.image.title=tessera",
            &ctr,
        ]))?;
        run(Command::new("buildah").args(["commit", "--quiet", &ctr, tag]))
    })();
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    result.map(|_| ())
}
