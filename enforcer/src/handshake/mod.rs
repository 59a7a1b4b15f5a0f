//! TCP-handshake mode in the kernel: the iptables rules (nft backend) that queue exactly the
//! handshake packets to us (`rules`), the NFQUEUE workers that run them through the engine
//! (`worker`, `tessera_proxy::handshake::engine`), and the watch of the connections they let
//! through until they end (`live`, with their ends as the kernel reports them: `closed`).
//!
//! Rules (IPv4 and IPv6 alike, in four chains of our own; docs/handshake.md has the table):
//! * `raw PREROUTING` (before conntrack, so the kernel never sees a token): packets carrying
//!   our option, every SYN-ACK (a missing token is a refusal for our own handshakes), resets
//!   (a refusal by the peer) and SYNs to workload ports go to the ingress queue.
//! * `mangle PREROUTING`: a packet the engine marked proven stamps its connection
//!   (connmark); any other packet to a workload port of an unproven connection goes to the
//!   engine, which passes only those queued behind their connection's proof. So a
//!   connection reaches the application only once the client proved itself.
//! * `mangle OUTPUT` / `POSTROUTING` (after conntrack, which so never sees a token either):
//!   the SYN of sockets the connect hooks marked, their packets until the first ACK went, and
//!   SYN-ACKs from workload ports go to the egress queue; the engine's acked bit is saved in
//!   the connmark, after which nothing of the connection is queued.
//!
//! * Ingress has two queues: packets from the directory's peer addresses go to a lane of
//!   their own (`lane`), so that a flood from spoofed strangers fills only theirs.
//!
//! Fail closed: while no enforcer reads the queues, queued packets are dropped (only
//! SYN-ACKs and resets bypass: they only answer SYNs that an enforcer sent). `fail_open` lets SYNs
//! to workload ports through instead. No sysctl is changed.
//!
//! `iptables`, `ip6tables` and `ss` run by the absolute paths [`tools`] finds once at
//! start-up in the system directories (never `$PATH`), in a clean environment.
use std::{sync::Arc, time::Duration};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tessera_proxy::{flow::now_ms, handshake::engine::Engine, registry::ConnectionRegistry};
use tokio::sync::mpsc;

use crate::{config::Config, metrics::Metrics};

mod closed;
pub mod fast;
mod lane;
mod live;
mod rules;
mod tools;
mod worker;

pub use rules::{PreparedRules, prepare_rules, remove_rules};
pub use tools::{ENV, SYSTEM_DIRS, ToolError, Tools, find, run_program, tools};
use worker::{Handler, Queue, RawSender, worker};

/// Connections handed over to the watcher, and close reports, waiting at most (both
/// channels apply backpressure rather than drop: see `worker` and `closed`).
const WATCH_QUEUE: usize = 16_384;

/// Starts the peers' lane (its sets filled from `directory`, and following it), the
/// workers (a thread per queue), the watch of live connections and the expiry of
/// unfinished handshakes.
pub fn start(
    config: &Config,
    directory: Arc<tessera_proxy::peers::Directory>,
    engine: Arc<Engine>,
    registry: Arc<ConnectionRegistry>,
    closed: RingBuf<MapData>,
    metrics: Arc<Metrics>,
    fast: Option<Arc<fast::FastPath>>,
) -> Result<()> {
    let h = &config.handshake;
    let ss = tools()?.ss.clone();
    // The sets before the rules that name them.
    let lane = Arc::new(lane::Lane::new()?);
    let addresses = lane.sync(&directory.table())?;
    tracing::debug!(addresses, "peers' lane");
    lane.follow(directory.clone());
    let sender = Arc::new(RawSender::new(config.bpf.proxy_mark)?);
    let (live_tx, live_rx) = mpsc::channel(WATCH_QUEUE);
    let (closed_tx, closed_rx) = mpsc::channel(WATCH_QUEUE);
    let fast_events = fast.as_ref().and_then(|f| {
        Some(closed::FastEvents {
            ring: f.take_events()?,
            path: f.clone(),
            live: live_tx.clone(),
        })
    });
    tokio::spawn(closed::read_closed(closed, closed_tx, fast_events));
    tokio::spawn(live::watch(
        registry.clone(),
        live_rx,
        closed_rx,
        ss,
        metrics,
    ));
    if let Some(fast) = &fast {
        fast.run_delayed()?;
        // Whenever a policy is replaced, the pairs it no longer allows lose their keys:
        // their next connection is refused. (The registry also announces a peer that left,
        // whose keys the directory change revoked already: no policy changed then.)
        fast.set_policy(registry.decisions());
        let (fast_, mut reloads, registry) = (fast.clone(), registry.reloads(), registry.clone());
        tokio::spawn(async move {
            let mut seen = registry.decisions().generation();
            while reloads.changed().await.is_ok() {
                let now = registry.decisions().generation();
                if now != seen {
                    seen = now;
                    fast_.revoke_denied(registry.decisions());
                }
            }
        });
        // Directory changes revoke the keys of the peers they concern: called by whoever
        // changes it, once the peers' keys are in force too (`app::control::Live::peers`).
    }
    let handler = if h.pass_through {
        tracing::warn!(
            "handshake.pass_through: every handshake passes UNVERIFIED (a benchmark baseline, never for production)"
        );
        Handler::PassThrough {
            proven: h.proven_bit,
            acked: h.acked_bit,
        }
    } else {
        Handler::Engine(engine.clone())
    };
    for (num, side, name) in [
        (h.queue, Queue::Egress, "tessera-hs-egress"),
        (h.queue + 1, Queue::Ingress, "tessera-hs-ingress"),
        (h.queue + 2, Queue::Ingress, "tessera-hs-peers"),
    ] {
        let (handler, sender) = (handler.clone(), sender.clone());
        let live_tx = live_tx.clone();
        let fast = fast.clone();
        // Bind in the thread but report a failure to bind here, before we say ready.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = worker(num, side, handler, sender, live_tx, fast);
                if let Err(e) = &result {
                    tracing::error!(
                        queue = num,
                        error = format!("{e:#}"),
                        "handshake worker stopped"
                    );
                }
                let _ = tx.send(result.map(|_| ()));
            })?;
        // A worker that is running has nothing to report within this time.
        if let Ok(Err(e)) = rx.recv_timeout(Duration::from_millis(200)) {
            return Err(e);
        }
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            // Each expired handshake writes its own record.
            engine.expire(now_ms());
        }
    });
    Ok(())
}
