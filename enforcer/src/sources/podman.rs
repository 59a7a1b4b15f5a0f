//! Containers from podman (or Docker), through the runtime's Docker-compatible API socket.
//!
//! Why podman's *compatible* API: it is the runtime Debian ships that runs on these hosts
//! (`podman system service` serves the API on a unix socket, no daemon otherwise), and the
//! same endpoints are Docker's, so one source serves both. What is read, all from the
//! runtime, never from inside the container:
//! * `GET /containers/{id}/json`: name, labels it was started with, image name, the image's
//!   id, exposed ports, the process id (its cgroup is read from the kernel:
//!   `/proc/<pid>/cgroup`);
//! * `GET /images/{image id}/json`: `RepoDigests`, for the image's manifest digest;
//! * `GET /events` (type container), streamed: `init`/`start` enrol, `die`/`remove` unenrol;
//! * `GET /containers/json` at every (re)connection: what runs now, so nothing is missed
//!   while the stream was down.
//!
//! A connection from a container cgroup nobody has reported yet asks
//! ([`DynamicWorkloads::resolve`]); the question is answered here by inspecting the
//! container whose id the cgroup's name carries (`libpod-<id>`, `docker-<id>.scope`).
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tessera_proxy::identity::reserved;
use tokio::net::UnixStream;

use super::{
    Discovered, SourceEvent,
    dynamic::{DynamicWorkloads, Entry},
};

/// An answer larger than this is refused (an inspect is a few kB).
const MAX_ANSWER: usize = 4 << 20;
/// The listing of what runs holds every container's labels: room for 10,000 of them.
const MAX_LISTING: usize = 256 << 20;
/// One request to the runtime may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The event stream, containers only.
const EVENTS_PATH: &str = "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%7D";
/// An event line longer than this is dropped.
const MAX_EVENT_LINE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container runtime socket {socket}: {error}")]
    Connect {
        socket: String,
        error: std::io::Error,
    },
    #[error("container runtime {path}: {error}")]
    Http { path: String, error: String },
    #[error("container runtime {path}: status {status}")]
    Status { path: String, status: StatusCode },
    #[error("container runtime {path}: answer is not what the API documents: {error}")]
    Parse { path: String, error: String },
    #[error("container runtime: no answer to {path} within {REQUEST_TIMEOUT:?}")]
    Timeout { path: String },
}

/// The parts of `GET /containers/{id}/json` we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    id: String,
    name: String,
    /// The image's id (`sha256:<config digest>`).
    image: String,
    state: InspectState,
    config: InspectConfig,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectState {
    #[serde(default)]
    pid: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectConfig {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    /// The image as it was asked for (`localhost/web:1`).
    #[serde(default)]
    image: String,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImageInspect {
    #[serde(default)]
    repo_digests: Option<Vec<String>>,
    #[serde(default)]
    config: Option<ImageConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImageConfig {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Listed {
    id: String,
}

/// One event of the stream (Docker's form, which podman serves too).
#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(default)]
    id: String,
}

/// A container runtime's API.
#[derive(Clone, Debug)]
pub struct Runtime {
    socket: PathBuf,
    /// Where the cgroup v2 hierarchy is mounted (`/proc/<pid>/cgroup` paths are relative).
    cgroup_mount: PathBuf,
}

impl Runtime {
    pub fn new(socket: PathBuf, cgroup_mount: PathBuf) -> Self {
        Self {
            socket,
            cgroup_mount,
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, RuntimeError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| RuntimeError::Connect {
                    socket: self.socket.display().to_string(),
                    error,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| RuntimeError::Http {
                path: self.socket.display().to_string(),
                error: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "container runtime connection ended");
            }
        });
        Ok(sender)
    }

    async fn request(
        &self,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RuntimeError> {
        let mut sender = self.connect().await?;
        let req = Request::get(path)
            .header("host", "runtime")
            .body(Empty::<Bytes>::new())
            .map_err(|e| RuntimeError::Http {
                path: path.into(),
                error: e.to_string(),
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RuntimeError::Http {
                path: path.into(),
                error: e.to_string(),
            })?;
        Ok(resp)
    }

    /// `GET path` as JSON; `None` for 404.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, RuntimeError> {
        self.get_limited(path, MAX_ANSWER).await
    }

    /// `GET path` as JSON, an answer of at most `limit` bytes; `None` for 404.
    async fn get_limited<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<Option<T>, RuntimeError> {
        let fetch = async {
            let resp = self.request(path).await?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(RuntimeError::Status {
                    path: path.into(),
                    status,
                });
            }
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| RuntimeError::Http {
                    path: path.into(),
                    error: e.to_string(),
                })?
                .to_bytes();
            serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| RuntimeError::Parse {
                    path: path.into(),
                    error: e.to_string(),
                })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fetch)
            .await
            .map_err(|_| RuntimeError::Timeout { path: path.into() })?
    }

    /// The container `id` as a workload under `parent` (with its process if it has a network
    /// namespace of its own); `None` if the runtime does not know it, it has no process
    /// (yet, or any more), or its cgroup is not under `parent`.
    pub async fn inspect(
        &self,
        id: &str,
        parent: &Path,
    ) -> Result<Option<Discovered>, RuntimeError> {
        if !is_container_id(id) {
            return Ok(None);
        }
        let Some(c) = self
            .get::<Inspect>(&format!("/containers/{id}/json"))
            .await?
        else {
            return Ok(None);
        };
        if c.state.pid <= 0 {
            return Ok(None);
        }
        let Some(cgroup) = self.cgroup_of(c.state.pid) else {
            return Ok(None);
        };
        if !cgroup.starts_with(parent) || cgroup == parent {
            tracing::debug!(id, cgroup = %cgroup.display(), "container outside the enrolled parent cgroup");
            return Ok(None);
        }
        // The container's own cgroup: the level directly below the parent.
        let first = cgroup
            .strip_prefix(parent)
            .ok()
            .and_then(|r| r.components().next())
            .map(|c| parent.join(c));
        let Some(cgroup) = first else { return Ok(None) };
        // The runtime names the container's own cgroup after it (`libpod-<id>`): anything
        // else is a process that is not the container's any more (its pid reused) or a
        // layout whose levels are not containers (podman pods): not vouched for.
        if id_of_cgroup(&cgroup).as_deref() != Some(c.id.as_str()) {
            tracing::warn!(id, cgroup = %cgroup.display(), "the container's process is in a cgroup not named after it (a reused pid, or a pod): not enrolled");
            return Ok(None);
        }
        // Who the image is: its manifest digest as the runtime resolved it; the labels it
        // carries are its author's, not the operator's: they do not count.
        let (digest, image_labels) = match self
            .get::<ImageInspect>(&format!("/images/{}/json", c.image))
            .await?
        {
            Some(img) => (
                image_digest(&c.config.image, img.repo_digests.as_deref().unwrap_or(&[])),
                img.config.and_then(|c| c.labels).unwrap_or_default(),
            ),
            None => (None, BTreeMap::new()),
        };
        let mut c = c;
        if let Some(labels) = c.config.labels.as_mut() {
            labels.retain(|k, v| image_labels.get(k) != Some(v));
        }
        let pid = c.state.pid;
        let found = discovered(c, cgroup, digest);
        Ok(Some(if own_netns(pid) {
            found.in_netns_of(pid as u32)
        } else {
            found
        }))
    }

    /// Ids of the containers running now.
    pub async fn running(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self
            .get_limited::<Vec<Listed>>("/containers/json", MAX_LISTING)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.id)
            .collect())
    }

    /// The cgroup v2 directory of a process, from the kernel.
    fn cgroup_of(&self, pid: i64) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(self.cgroup_mount.join(rel.trim_start_matches('/')))
    }
}

/// Whether process `pid` is in another network namespace than the enforcer: the container
/// is served in its own (tunnel mode), or refused (handshake mode's rules live in the
/// host's). Unreadable counts as its own: it is then checked when adopted.
fn own_netns(pid: i64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ns(&format!("/proc/{pid}/ns/net")), ns("/proc/self/ns/net")) {
        (Some(theirs), Some(ours)) => theirs != ours,
        // Gone or unreadable: nothing to vouch for.
        _ => true,
    }
}

fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id a runtime's cgroup directory name carries.
pub fn id_of_cgroup(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let name = name.strip_suffix(".scope").unwrap_or(name);
    let id = ["libpod-", "docker-"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    is_container_id(id).then(|| id.to_owned())
}

/// The manifest digest among an image's `RepoDigests` (`repo@sha256:…`): the one of the
/// repository the container was started from, else the first.
fn image_digest(image: &str, repo_digests: &[String]) -> Option<String> {
    let repo = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map(|(r, _)| r)
        .unwrap_or(image);
    let split = |d: &String| {
        d.split_once('@')
            .map(|(r, dg)| (r.to_owned(), dg.to_owned()))
    };
    let all: Vec<(String, String)> = repo_digests.iter().filter_map(split).collect();
    all.iter()
        .find(|(r, _)| r == repo)
        .or(all.first())
        .map(|(_, d)| d.clone())
        .filter(|d| d.starts_with("sha256:") && d.len() == 71)
}

/// A workload name from a container's: its own if valid, else `ctr-<id prefix>`.
fn workload_name(name: &str, id: &str) -> String {
    let name = name.trim_start_matches('/');
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        name.to_owned()
    } else {
        format!("ctr-{}", &id[..12.min(id.len())])
    }
}

/// The label a container is started with to say which TCP ports it serves
/// (`--label tessera.ports=9000,9001`), for runtimes that report no exposed ports for a
/// container on the host's network (podman drops `--expose` there).
pub const PORTS_LABEL: &str = "tessera.ports";

/// The TCP ports a container serves: what the runtime says it exposes ("8080/tcp", or
/// "8080": TCP is the default; "53/udp" is not TCP) and what [`PORTS_LABEL`] lists.
fn served_ports(
    exposed: Option<&BTreeMap<String, serde_json::Value>>,
    labels: &BTreeMap<String, String>,
) -> Vec<u16> {
    let exposed =
        exposed
            .into_iter()
            .flat_map(|m| m.keys())
            .filter_map(|p| match p.split_once('/') {
                Some((port, "tcp")) => Some(port),
                Some(_) => None,
                None => Some(p.as_str()),
            });
    let labelled = labels
        .get(PORTS_LABEL)
        .into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim);
    let mut ports: Vec<u16> = exposed
        .chain(labelled)
        .filter_map(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn discovered(c: Inspect, cgroup: PathBuf, digest: Option<String>) -> Discovered {
    let mut derived = BTreeMap::from([
        (reserved::CONTAINER_ID, c.id.clone()),
        (
            reserved::CONTAINER_NAME,
            c.name.trim_start_matches('/').to_owned(),
        ),
    ]);
    if !c.config.image.is_empty() {
        derived.insert(reserved::IMAGE, c.config.image.clone());
    }
    if let Some(d) = digest {
        derived.insert(reserved::IMAGE_DIGEST, d);
    }
    let labels = c.config.labels.unwrap_or_default();
    let ports = served_ports(c.config.exposed_ports.as_ref(), &labels);
    Discovered::new(
        format!("container:{}", c.id),
        workload_name(&c.name, &c.id),
        cgroup,
        labels,
        derived,
        ports,
    )
}

/// Follows the runtime for `registry`'s parent cgroup until the process ends: reports what
/// runs at each (re)connection, then the event stream; answers the registry's questions.
pub async fn follow(
    runtime: Runtime,
    registry: Arc<DynamicWorkloads>,
    questions: &mut tokio::sync::mpsc::Receiver<PathBuf>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut known: HashSet<String> = HashSet::new();
    loop {
        match session(&runtime, &registry, questions, &mut known).await {
            Ok(()) => {
                tracing::info!(socket = %runtime.socket.display(), "container runtime closed its event stream: reconnecting")
            }
            Err(e) => tracing::warn!(error = %e, "container runtime: reconnecting"),
        }
        // Questions asked while the runtime is away get no answer: their connections are
        // refused when their wait ends (fail closed).
        while questions.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Reports container `id`. Only a runtime that cannot be reached is an error (the session
/// starts again); one container the runtime cannot describe is skipped, and stays without
/// identity.
async fn report(
    runtime: &Runtime,
    registry: &DynamicWorkloads,
    known: &mut HashSet<String>,
    id: &str,
) -> Result<(), RuntimeError> {
    let inspected = match runtime.inspect(id, registry.root()).await {
        Ok(i) => i,
        Err(e @ (RuntimeError::Connect { .. } | RuntimeError::Timeout { .. })) => return Err(e),
        Err(e) => {
            tracing::warn!(id, error = %e, "container not enrolled: the runtime's answer about it is unusable");
            return Ok(());
        }
    };
    match inspected {
        Some(found) => {
            known.insert(found.key.clone());
            registry.apply(SourceEvent::Up(found));
        }
        None => tracing::debug!(
            id,
            "container not enrolled here (no process, or not under the parent)"
        ),
    }
    Ok(())
}

async fn session(
    runtime: &Runtime,
    registry: &DynamicWorkloads,
    questions: &mut tokio::sync::mpsc::Receiver<PathBuf>,
    known: &mut HashSet<String>,
) -> Result<(), RuntimeError> {
    // The stream first, so nothing that happens during the listing is missed.
    // `filters={"type":["container"]}`, percent-encoded.
    let path = EVENTS_PATH.to_owned();
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, runtime.request(&path))
        .await
        .map_err(|_| RuntimeError::Timeout { path: path.clone() })??;
    if !resp.status().is_success() {
        return Err(RuntimeError::Status {
            path,
            status: resp.status(),
        });
    }
    let mut body = resp.into_body();
    let running = runtime.running().await?;
    let now: HashSet<String> = running.iter().map(|id| format!("container:{id}")).collect();
    for gone in known.difference(&now).cloned().collect::<Vec<_>>() {
        known.remove(&gone);
        registry.apply(SourceEvent::Down { key: gone });
    }
    for id in &running {
        report(runtime, registry, known, id).await?;
    }
    tracing::info!(socket = %runtime.socket.display(), running = running.len(), enrolled = registry.len(), "following the container runtime");
    let mut line = Vec::new();
    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(frame) = frame else { return Ok(()) };
                let frame = frame.map_err(|e| RuntimeError::Http { path: path.clone(), error: e.to_string() })?;
                let Ok(data) = frame.into_data() else { continue };
                for &b in data.iter() {
                    if b != b'\n' {
                        if line.len() >= MAX_EVENT_LINE {
                            // An event we cannot read may be a stop: start again from a
                            // fresh listing rather than miss it.
                            return Err(RuntimeError::Parse { path, error: format!("an event longer than {MAX_EVENT_LINE} bytes") });
                        }
                        line.push(b);
                        continue;
                    }
                    let taken = std::mem::take(&mut line);
                    match serde_json::from_slice::<Event>(&taken) {
                        Ok(ev) => on_event(runtime, registry, known, ev).await?,
                        Err(e) => tracing::warn!(error = %e, "container runtime: an event that is not JSON: skipped"),
                    }
                }
            }
            Some(dir) = questions.recv() => {
                match id_of_cgroup(&dir) {
                    Some(id) => report(runtime, registry, known, &id).await?,
                    None => tracing::debug!(cgroup = %dir.display(), "no container id in this cgroup's name"),
                }
                if !matches!(registry.get(&dir), Some(Entry::Enrolled(_)) | Some(Entry::Refused(_))) {
                    registry.refuse_unknown(&dir, "the container runtime knows no running container in this cgroup");
                }
            }
        }
    }
}

async fn on_event(
    runtime: &Runtime,
    registry: &DynamicWorkloads,
    known: &mut HashSet<String>,
    ev: Event,
) -> Result<(), RuntimeError> {
    if ev.kind != "container" || !is_container_id(&ev.id) {
        return Ok(());
    }
    match ev.action.as_str() {
        "init" | "start" | "restart" | "unpause" | "update" => {
            report(runtime, registry, known, &ev.id).await
        }
        "die" | "died" | "stop" | "kill" | "remove" | "cleanup" => {
            let key = format!("container:{}", ev.id);
            // Also for a container never reported: the runtime's hook may have had its
            // namespace served before it ran (released here; a no-op otherwise).
            if ev.action != "kill" {
                known.remove(&key);
                registry.apply(SourceEvent::Down { key });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_runtimes_cgroup_names() {
        let id = "ab".repeat(32);
        assert_eq!(
            id_of_cgroup(Path::new(&format!("/cg/p/libpod-{id}"))),
            Some(id.clone())
        );
        assert_eq!(
            id_of_cgroup(Path::new(&format!("/cg/p/docker-{id}.scope"))),
            Some(id.clone())
        );
        assert_eq!(
            id_of_cgroup(Path::new(&format!("/cg/p/{id}"))),
            Some(id.clone())
        );
        assert_eq!(id_of_cgroup(Path::new("/cg/p/libpod-conmon")), None);
        assert_eq!(id_of_cgroup(Path::new("/cg/p/libpod-../../x")), None);
    }

    #[test]
    fn the_digest_is_the_started_repositorys() {
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let digests = vec![format!("other/x@{d1}"), format!("localhost/web@{d2}")];
        assert_eq!(image_digest("localhost/web:1", &digests), Some(d2.clone()));
        assert_eq!(
            image_digest("registry:5000/web", &[format!("registry:5000/web@{d2}")]),
            Some(d2)
        );
        assert_eq!(image_digest("nothing:1", &digests), Some(d1));
        assert_eq!(image_digest("x", &["x@md5:zz".into()]), None);
        assert_eq!(image_digest("x", &[]), None);
    }

    #[test]
    fn names_and_ports_as_the_runtime_gives_them() {
        let id = "cd".repeat(32);
        assert_eq!(workload_name("/web-1", &id), "web-1");
        assert_eq!(
            workload_name(&format!("/{}", "n".repeat(70)), &id),
            "ctr-cdcdcdcdcdcd"
        );
        assert_eq!(workload_name("/a b", &id), "ctr-cdcdcdcdcdcd");
        let c: Inspect = serde_json::from_value(serde_json::json!({
            "Id": id, "Name": "/web", "Image": "sha256:00",
            "State": {"Pid": 42},
            "Config": {
                "Image": "localhost/web:1",
                "Labels": {"app": "web", "tessera.io/image-digest": "sha256:forged", "tessera.ports": "7000, x,9000"},
                "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9000": {}}
            }
        }))
        .unwrap();
        let d = discovered(
            c,
            PathBuf::from("/cg/p/libpod-x"),
            Some("sha256:real".into()),
        );
        assert_eq!(d.ports, vec![7000, 8080, 9000]);
        assert_eq!(d.labels["app"], "web");
        assert!(!d.labels.contains_key(reserved::IMAGE_DIGEST));
        assert_eq!(d.derived[reserved::IMAGE_DIGEST], "sha256:real");
        assert_eq!(d.derived[reserved::IMAGE], "localhost/web:1");
        assert_eq!(d.key, format!("container:{id}"));
    }
}
