//! Traffic programs for the benchmark, run inside test hosts as ordinary processes (the
//! bench starts `xtask load ...` in a host's namespace and cgroup). Rust rather than Python
//! so that the load generator is not the bottleneck being measured. Every loop is bounded
//! in count and time.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum LoadCommand {
    /// Echo server for every connection until EOF.
    ServeEcho { port: u16 },
    /// Open, ping, close connections for SECONDS (at most MAX) with CONCURRENCY threads.
    Connrate {
        addr: SocketAddr,
        seconds: f64,
        max: u64,
        concurrency: usize,
    },
    /// COUNT 64-byte request/responses on one connection; latency percentiles.
    Rr { addr: SocketAddr, count: usize },
    /// Open N connections (each echoes one byte end to end), write READY_FILE, hold them
    /// for at most SECONDS.
    Hold {
        addr: SocketAddr,
        n: usize,
        ready_file: std::path::PathBuf,
        seconds: u64,
    },
    /// Until a connection to ADDR echoes a byte (at most SECONDS; an attempt every
    /// INTERVAL_MS): write READY_FILE once an attempt has failed, then the wall-clock time
    /// (Unix microseconds) of the first success to OUT_FILE. Fails if the first attempt
    /// already succeeds (nothing to wait for).
    Probe {
        addr: SocketAddr,
        seconds: f64,
        interval_ms: u64,
        ready_file: std::path::PathBuf,
        out_file: std::path::PathBuf,
    },
    /// One run of the fleet bench (see fleet.rs); its figures as JSON.
    Fleet(crate::fleet::FleetArgs),
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_NOFILE, 1 << 20, 1 << 20);
}

pub fn run(cmd: LoadCommand) -> Result<()> {
    raise_fd_limit();
    match cmd {
        LoadCommand::ServeEcho { port } => serve_echo(port),
        LoadCommand::Connrate {
            addr,
            seconds,
            max,
            concurrency,
        } => connrate(addr, seconds, max, concurrency),
        LoadCommand::Rr { addr, count } => rr(addr, count),
        LoadCommand::Hold {
            addr,
            n,
            ready_file,
            seconds,
        } => hold(addr, n, &ready_file, seconds),
        LoadCommand::Probe {
            addr,
            seconds,
            interval_ms,
            ready_file,
            out_file,
        } => probe(addr, seconds, interval_ms, &ready_file, &out_file),
        LoadCommand::Fleet(args) => crate::fleet::run_child(args),
    }
}

fn serve_echo(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        loop {
            let (mut s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

fn ping(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"p")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

fn connrate(addr: SocketAddr, seconds: f64, max: u64, concurrency: usize) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && done.load(Ordering::Relaxed) < max
                {
                    match ping(addr) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => {
                            if errors.fetch_add(1, Ordering::Relaxed) > 1000 {
                                stop.store(true, Ordering::Relaxed);
                            }
                            0
                        }
                    };
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({"connections": n, "errors": errors.load(Ordering::Relaxed), "seconds": secs, "per_second": n as f64 / secs})
    );
    Ok(())
}

fn rr(addr: SocketAddr, count: usize) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = [b'x'; 64];
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    // Warm-up round trips are not counted.
    for _ in 0..100 {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    let mut lat = Vec::with_capacity(count);
    // When each round trip started (µs since the first): whether the slow ones come in
    // bursts (something else took the CPU for a while) or spread out (the path itself).
    let mut at = Vec::with_capacity(count);
    let start = Instant::now();
    while lat.len() < count && Instant::now() < deadline {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        at.push(t.duration_since(start).as_micros() as u64);
    }
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let pick = |q: f64| sorted[((q * sorted.len() as f64) as usize).min(sorted.len() - 1)];
    let p99 = pick(0.99);
    // The slowest 1 %: in how many distinct 10 ms windows, and how long the run took.
    let mut windows: Vec<u64> = lat
        .iter()
        .zip(&at)
        .filter(|(l, _)| **l >= p99)
        .map(|(_, t)| t / 10_000)
        .collect();
    windows.dedup();
    println!(
        "{}",
        json!({
            "count": lat.len(),
            "p50_us": pick(0.50),
            "p90_us": pick(0.90),
            "p99_us": p99,
            "p999_us": pick(0.999),
            "max_us": sorted.last().copied().unwrap_or(0.0),
            "slowest_1pct_in_10ms_windows": windows.len(),
            "run_ms": at.last().copied().unwrap_or(0) / 1000,
        })
    );
    Ok(())
}

fn hold(addr: SocketAddr, n: usize, ready_file: &std::path::Path, seconds: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut held = Vec::with_capacity(n);
    let opening = Instant::now();
    for i in 0..n {
        // Generous: every held connection needs a tunnel of its own, so this is a burst of
        // thousands of new TLS sessions on two shared cores.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
            .with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"h")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("echo on connection {i}"))?;
        held.push(s);
        if Instant::now() > deadline {
            bail!("opened only {i} connections before the deadline");
        }
    }
    std::fs::write(
        ready_file,
        format!("{} {}", held.len(), opening.elapsed().as_secs_f64()),
    )?;
    while Instant::now() < deadline && ready_file.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One attempt: connect, echo one byte, each step bounded by `timeout`.
fn echo_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"p")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

fn probe(
    addr: SocketAddr,
    seconds: f64,
    interval_ms: u64,
    ready_file: &std::path::Path,
    out_file: &std::path::Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        if echo_once(addr, Duration::from_millis(300)).is_ok() {
            if attempts == 1 {
                bail!("{addr}: the first attempt already succeeded");
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            std::fs::write(
                out_file,
                json!({"unix_us": now.as_micros() as u64, "attempts": attempts}).to_string(),
            )?;
            return Ok(());
        }
        if attempts == 1 {
            std::fs::write(ready_file, "failing")?;
        }
        if Instant::now() > deadline {
            bail!("{addr}: no echo within {seconds} s ({attempts} attempts)");
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}
