//! `cargo xtask image`: the release `tessera` (with its eBPF object) in a container image,
//! `localhost/tessera:<version>` by default, the one `deploy/kubernetes/` names. The root
//! file system is assembled by the test harness (`tessera_tests::image`), so the image
//! test checks exactly what this builds.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::build;

/// Builds the image `tag` from `bin` (default: a fresh release build).
pub fn run(bin: Option<&Path>, tag: Option<&str>) -> Result<()> {
    let bin: PathBuf = match bin {
        Some(b) => b.to_owned(),
        None => build::release()?,
    };
    let tag = tag.map_or_else(tessera_tests::image::default_tag, str::to_owned);
    let work = build::target_dir().join("image");
    tessera_tests::image::build(&bin, &tag, &work)?;
    println!("built {tag} from {}", bin.display());
    println!(
        "load it into a cluster's nodes (e.g. `podman save {tag} | ctr -n k8s.io images import -`)"
    );
    println!("or push it to your registry and change the image in deploy/kubernetes/");
    Ok(())
}
