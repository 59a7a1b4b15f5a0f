//! The runtime's hook: a container with a network namespace of its own is served in it
//! *before* its first instruction runs.
//!
//! Without it there is a moment, between the runtime starting a container and the enforcer
//! hearing of it, in which the container's connects are refused (EPERM: the connect hooks
//! let a foreign namespace's connects through only once the enforcer serves it). The
//! runtime runs OCI hooks synchronously while it creates a container (`prestart`, after its
//! namespaces exist and before its process is started), as istio-cni's plugin tells
//! ztunnel about a pod before the pod runs: `tessera oci-hook` passes the container's id
//! and pid on to the enforcer's hook socket (`[containers] hook_socket`) and returns once
//! the enforcer serves the container's namespace.
//!
//! The socket is root's (0600): a request only makes the enforcer serve the namespace of a
//! process that is in the containers' parent cgroup, under the container's own key, which
//! the runtime's report and its end (`die`, `remove`) use too. Requests are one JSON line,
//! at most [`MAX_REQUEST`] bytes, read within [`REQUEST_TIMEOUT`]; the answer is one line.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::dynamic::Networks;

/// At most this many bytes in a request.
pub const MAX_REQUEST: usize = 4096;
/// A request must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `tessera oci-hook` waits for the enforcer's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the hook asks: the part of the OCI state it needs.
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    pub id: String,
    pub pid: u32,
}

/// What the enforcer answers.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Answer {
    /// The container's namespace is served now (false: not one of the enforcer's, or on
    /// the host's network: nothing to do).
    pub served: bool,
    /// Why it could not be served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Serves hook requests on `listener` (from [`bind`]) for containers under `parent`
/// (cgroup v2 mount `mount`), making `networks` serve their namespaces. Runs until the
/// process ends.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    parent: PathBuf,
    mount: PathBuf,
    networks: Arc<dyn Networks>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "hook socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (parent, mount, networks) = (parent.clone(), mount.clone(), networks.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &parent, &mount, networks).await {
                tracing::warn!(error = %e, "hook request failed");
            }
        });
    }
}

/// The socket, root's alone (a stale one from a previous run replaced).
pub fn bind(socket: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("containers: hook_socket: {}: {e}", socket.display()),
        )
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn answer(
    conn: UnixStream,
    parent: &Path,
    mount: &Path,
    networks: Arc<dyn Networks>,
) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let answer = match read {
        Err(_) => Answer::refused("no request within 5 s"),
        Ok(Err(e)) => Answer::refused(&format!("reading the request: {e}")),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Answer::refused(&format!("not a request: {e}")),
            Ok(req) => {
                let (parent, mount) = (parent.to_owned(), mount.to_owned());
                tokio::task::spawn_blocking(move || handle(&req, &parent, &mount, &*networks))
                    .await
                    .unwrap_or_else(|e| Answer::refused(&e.to_string()))
            }
        },
    };
    let mut text = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    text.push(b'\n');
    write.write_all(&text).await
}

impl Answer {
    fn refused(why: &str) -> Self {
        Answer {
            served: false,
            error: Some(why.to_owned()),
        }
    }
}

/// One request: serve the namespace of `req.pid` if it is a container of ours with a
/// network of its own.
pub fn handle(req: &Request, parent: &Path, mount: &Path, networks: &dyn Networks) -> Answer {
    if req.id.len() != 64 || !req.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Answer::refused("id: not a container id");
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", req.pid))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|rel| mount.join(rel.trim().trim_start_matches('/')))
        });
    let Some(cgroup) = cgroup else {
        return Answer::refused(&format!("pid {}: no such process", req.pid));
    };
    // Not under the parent: not one of this enforcer's containers.
    if !cgroup.starts_with(parent) || cgroup == parent {
        return Answer {
            served: false,
            error: None,
        };
    }
    let own = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.ino()).ok()
    };
    if own(&format!("/proc/{}/ns/net", req.pid)) == own("/proc/self/ns/net") {
        return Answer {
            served: false,
            error: None,
        };
    }
    match networks.adopt(&format!("container:{}", req.id), req.pid, &cgroup) {
        Ok(_) => Answer {
            served: true,
            error: None,
        },
        Err(e) => Answer::refused(&e),
    }
}

/// `tessera oci-hook`: reads the OCI state on stdin, asks the enforcer at `socket`, and
/// fails (the runtime then does not start the container) if the enforcer could not serve
/// a container of its own. An enforcer that cannot be reached is a warning only: its
/// capture still refuses the container's connects until it serves it (fail closed).
pub fn run_hook(socket: &Path, state: &[u8]) -> anyhow::Result<()> {
    let req: Request = serde_json::from_slice(state)
        .map_err(|e| anyhow::anyhow!("the OCI state on stdin: {e}"))?;
    let ask = || -> std::io::Result<Answer> {
        use std::io::{BufRead, Read, Write};
        let mut conn = std::os::unix::net::UnixStream::connect(socket)?;
        conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        conn.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut line = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        conn.write_all(&line)?;
        let mut answer = String::new();
        std::io::BufReader::new(conn.take(MAX_REQUEST as u64)).read_line(&mut answer)?;
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    };
    match ask() {
        Ok(Answer {
            error: Some(why), ..
        }) => anyhow::bail!(
            "tessera: container {}: its network namespace cannot be served: {why}",
            req.id
        ),
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!(
                "tessera oci-hook: the enforcer at {} cannot be asked ({e}): container {}'s \
                 connects are refused until it serves the container",
                socket.display(),
                req.id
            );
            Ok(())
        }
    }
}
