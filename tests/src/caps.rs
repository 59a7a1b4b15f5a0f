//! The enforcer run with exactly the capabilities the Kubernetes DaemonSet gives it
//! (`deploy/kubernetes/enforcer.yaml`, read here) and none other: a wrapper drops every
//! other capability from the bounding set before it executes the `tessera` binary (root
//! uid, as in the pod). Tests run their enforcers through it ([`TestNet::set_bin`]) to show
//! the manifest's list is enough for what they exercise.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::tessera_bin;

/// Linux capability numbers (linux/capability.h) of the names a manifest may list.
const CAPS: &[(&str, u32)] = &[
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_PTRACE", 19),
    ("SYS_ADMIN", 21),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// The capabilities the DaemonSet adds (after dropping all), by number.
pub fn daemonset_capabilities() -> Result<Vec<u32>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer.yaml");
    let text = fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let ds: serde_json::Value = serde::Deserialize::deserialize(
        serde_yaml::Deserializer::from_str(&text)
            .next()
            .context("an empty manifest")?,
    )?;
    if ds["kind"] != "DaemonSet" {
        bail!(
            "{}: the first document is not the DaemonSet",
            path.display()
        );
    }
    let table: BTreeMap<&str, u32> = CAPS.iter().copied().collect();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("capabilities.add")?
        .iter()
        .map(|c| {
            let name = c.as_str().unwrap_or_default();
            table
                .get(name)
                .copied()
                .with_context(|| format!("capability {name}: add its number to CAPS"))
        })
        .collect()
}

/// Writes into `dir` a wrapper that keeps only `keep` in the bounding set and runs the
/// `tessera` binary with its arguments; its path.
pub fn capped_binary(dir: &Path, keep: &[u32]) -> Result<PathBuf> {
    let wrapper = dir.join("tessera-capped");
    let keep_list = keep
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/python3\n\
             import ctypes, os, sys\n\
             keep = {{{keep_list}}}\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             last = int(open('/proc/sys/kernel/cap_last_cap').read())\n\
             for cap in range(last + 1):\n\
             \x20   if cap not in keep and libc.prctl(24, cap, 0, 0, 0) != 0:\n\
             \x20       sys.exit('PR_CAPBSET_DROP %d: %s' % (cap, os.strerror(ctypes.get_errno())))\n\
             os.execv({bin:?}, ['tessera'] + sys.argv[1:])\n",
            bin = tessera_bin()?.display().to_string(),
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

/// Fails unless process `pid`'s effective capabilities are within `keep`.
pub fn check_capped(pid: u32, keep: &[u32]) -> Result<()> {
    let want: u64 = keep.iter().map(|c| 1u64 << c).sum();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16))
        .context("no CapEff")??;
    if eff & !want != 0 {
        bail!("process {pid} has more capabilities than kept: {eff:x}");
    }
    Ok(())
}
