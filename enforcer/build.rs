//! Builds what the `tessera` binary embeds, so it is self-contained:
//! * the eBPF object from `ebpf/` (aya-build), for `include_bytes!`;
//! * the web map (`web/`: cytoscape from the npm registry, bundled with esbuild), served
//!   by the enforcer's API with no CDN.
//!
//! Only with the `embed` feature (default). Without it nothing is built: the library then
//! needs neither bpf-linker nor node (the test harness and xtask build it so on a fresh
//! machine, before `cargo xtask setup`), and the code that would use the objects says so.

#[cfg(not(feature = "embed"))]
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}

#[cfg(feature = "embed")]
fn main() -> anyhow::Result<()> {
    embed::build()
}

#[cfg(feature = "embed")]
mod embed {
    use std::{path::Path, process::Command};

    use anyhow::{Context, Result, bail};

    fn run(cmd: &mut Command, what: &str) -> Result<()> {
        let status = cmd.status().with_context(|| {
            format!(
                "{what}: cannot start (node and npm are needed: `cargo xtask setup` installs them)"
            )
        })?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    }

    /// This package's directory, as cargo says at run time (not as it was when the build
    /// script was compiled: a build script compiled for one checkout may run for another).
    fn manifest_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .expect("cargo sets CARGO_MANIFEST_DIR for build scripts")
            .into()
    }

    fn build_web(out_dir: &Path) -> Result<()> {
        let web = manifest_dir().join("web");
        for f in ["src", "package.json", "package-lock.json"] {
            println!("cargo:rerun-if-changed={}", web.join(f).display());
        }
        let esbuild = web.join("node_modules/.bin/esbuild");
        if !esbuild.exists() {
            run(
                Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund"])
                    .current_dir(&web),
                "npm ci (enforcer/web)",
            )?;
        }
        run(
            Command::new(&esbuild)
                .args([
                    "src/main.js",
                    "--bundle",
                    "--minify",
                    "--format=iife",
                    "--target=es2020",
                    "--log-level=warning",
                ])
                .arg(format!("--outfile={}", out_dir.join("map.js").display()))
                .current_dir(&web),
            "esbuild (enforcer/web)",
        )
    }

    pub fn build() -> Result<()> {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        build_web(Path::new(&out_dir))?;
        // The eBPF target needs `-Z build-std=core`; aya-build passes it when RUSTC_BOOTSTRAP
        // is set, which lets the stable toolchain do it.
        // SAFETY: the build script is single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
        let root = manifest_dir().join("../ebpf");
        let root = root.to_str().expect("utf-8 path");
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "tessera-ebpf",
                root_dir: root,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom("stable"),
        )
    }
}
