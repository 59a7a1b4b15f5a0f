//! `tessera identity show`: what policy will match on, per workload and per process.
use std::fmt::Write;

use serde::Serialize;

use crate::{attest::ProcessAttestor, config::Config, policy};

#[derive(Serialize)]
pub struct ShownProcess {
    pub pid: u32,
    pub uid: u32,
    /// The labels this process's connections carry beyond the workload's.
    pub labels: Vec<(String, String)>,
}

#[derive(Serialize)]
pub struct ShownWorkload {
    pub name: String,
    pub spiffe: String,
    pub labels: Vec<(String, String)>,
    pub processes: Vec<ShownProcess>,
}

fn pids(cgroup: &std::path::Path, out: &mut Vec<u32>, depth: usize) {
    if let Ok(s) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if depth < 16 {
        for e in std::fs::read_dir(cgroup).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids(&e.path(), out, depth + 1);
            }
        }
    }
}

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn collect(config: &Config) -> Vec<ShownWorkload> {
    let attestor = ProcessAttestor::default();
    config
        .workloads
        .iter()
        .map(|w| {
            let local = policy::identity(config, w);
            let base: Vec<(String, String)> = local
                .identity
                .labels
                .iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
            let mut all = Vec::new();
            pids(&w.cgroup, &mut all, 0);
            let processes = all
                .into_iter()
                .filter_map(|pid| {
                    let uid = uid_of(pid)?;
                    let id = attestor.attest(&local.identity, pid, uid, &w.cgroup, None);
                    let labels = id
                        .labels
                        .iter()
                        .filter(|(k, v)| !base.iter().any(|(bk, bv)| bk == k && bv == v))
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect();
                    Some(ShownProcess { pid, uid, labels })
                })
                .collect();
            ShownWorkload {
                name: w.name.clone(),
                spiffe: local.identity.spiffe.clone(),
                labels: base,
                processes,
            }
        })
        .collect()
}

pub fn text(shown: &[ShownWorkload]) -> String {
    let mut out = String::new();
    for w in shown {
        let _ = writeln!(out, "workload {}  {}", w.name, w.spiffe);
        for (k, v) in &w.labels {
            let _ = writeln!(out, "  {k}={v}");
        }
        if w.processes.is_empty() {
            let _ = writeln!(out, "  (no process in its cgroup now)");
        }
        for p in &w.processes {
            let _ = writeln!(out, "  process {} (uid {}) adds:", p.pid, p.uid);
            for (k, v) in &p.labels {
                let _ = writeln!(out, "    {k}={v}");
            }
        }
    }
    out
}
