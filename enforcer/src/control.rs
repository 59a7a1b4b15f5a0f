//! An enforcer under a control plane (`[control]`): enrolment, the cache that lets it
//! fail static, renewal, and following the directory and the policy.
//!
//! At start-up, [`bootstrap`] turns the control plane's state into the configuration the
//! rest of the enforcer already understands — certificate and key, `[[peer]]` entries, the
//! policy file — from the cache in `state_dir` when there is one (so a restart needs no
//! server), else by enrolling with the join token or identity document. Then [`Agent::run`]
//! keeps it current: it watches the directory and policy (reconnecting with backoff, trying
//! each server), pushes every change to the running data path through [`Apply`] and into
//! the cache, renews the certificate at about half its life (with jitter, with the same
//! key, so tokens' signing key and live tunnels are unaffected) and reports what this
//! enforcer serves.
//!
//! Every file in `state_dir` is 0600 in a 0700 directory. When the server is unreachable
//! the enforcer keeps enforcing with what it has; when its certificate expires without
//! renewal, peers refuse its tunnels and tokens: new connections fail closed.
use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tessera_control::{
    api::WatchMessage,
    authority::{self, unix_ms},
    client::{Client, ClientError, Identity},
    document::SignedDocument,
    plane::{Credential, EnrolRequest, Enrolment},
    policy::PolicyVersion,
    registry::{DirectoryEntry, Serves},
};

use crate::config::{Config, PeerConfig};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/control";

/// `[control]`: the control plane this enforcer belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The control plane's servers (`https://host:port`), tried in turn.
    pub servers: Vec<String>,
    /// The control plane's CA certificate (its `ca.pem`).
    pub ca: PathBuf,
    /// A one-time join token (mode 0600), used once at the first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
    /// A signed cloud instance identity document (JSON), instead of a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_document_file: Option<PathBuf>,
    /// The instance this enforcer runs on (what its cloud's metadata service says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Key, certificate and the cached directory and policy.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The tunnel address peers dial (default: `listen.tunnel`, if it is not a wildcard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Destination networks whose workloads this enforcer protects.
    #[serde(default)]
    pub serves: Vec<IpNet>,
    /// How often this enforcer reports to the control plane (seconds).
    #[serde(default = "default_report_secs")]
    pub report_secs: u64,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_report_secs() -> u64 {
    10
}

impl ControlConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("control.servers: at least one server".into());
        }
        for s in &self.servers {
            if !s.starts_with("https://") {
                return Err(format!("control.servers: {s:?}: must be https://host:port"));
            }
        }
        match (&self.join_token_file, &self.identity_document_file) {
            (Some(_), Some(_)) => {
                return Err("control: join_token_file and identity_document_file: give one".into());
            }
            (None, Some(_)) if self.instance_id.is_none() => {
                return Err("control.instance_id: required with identity_document_file".into());
            }
            _ => {}
        }
        if self.report_secs == 0 {
            return Err("control.report_secs: at least 1".into());
        }
        Ok(())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            Some(&mut self.ca),
            self.join_token_file.as_mut(),
            self.identity_document_file.as_mut(),
            Some(&mut self.state_dir),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// The files of the cache.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub directory: PathBuf,
    pub policy: PathBuf,
    pub policy_meta: PathBuf,
    pub peers: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.into(),
            key: dir.join("key.pem"),
            cert: dir.join("cert.pem"),
            ca: dir.join("ca.pem"),
            directory: dir.join("directory.json"),
            policy: dir.join("policy.yaml"),
            policy_meta: dir.join("policy.json"),
            peers: dir.join("peers"),
        }
    }

    fn peer_cert(&self, name: &str) -> PathBuf {
        self.peers.join(format!("{name}.pem"))
    }
}

/// Writes `bytes` to `path` (0600) through a temporary file, so a crash never leaves half.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("control.state_dir: cannot create {}", dir.display()))
}

/// A policy that allows nothing: in force until the control plane's first policy arrives.
pub const NO_POLICY_YET: &str = "rules: []\n";

/// What the running enforcer does with changes.
pub trait Apply: Send + Sync + 'static {
    /// The directory changed: every other active enforcer, as `[[peer]]` entries.
    fn peers(&self, peers: &[PeerConfig]);
    /// A new policy (already validated by the control plane; checked again here).
    fn policy(&self, policy: &PolicyVersion) -> Result<()>;
    /// This enforcer's certificate was renewed (same key).
    fn certificate(&self, cert_pem: &str) -> Result<()>;
    /// This enforcer's own map now (what it saw), for the fleet's map at the control plane.
    fn map(&self) -> tessera_proxy::map::Map;
}

/// The state [`Agent::run`] carries on with.
pub struct Agent {
    config: ControlConfig,
    name: String,
    paths: Paths,
    key_pkcs8: Vec<u8>,
    cert_pem: String,
    ca_pem: String,
    directory: BTreeMap<String, DirectoryEntry>,
    policy_version: u64,
    serves: Serves,
    /// A digest of the map last sent (a map is sent again only when it changed).
    map_sent: Option<[u8; 32]>,
    /// The watch opened at start-up (its snapshot already taken), for [`Agent::run`].
    /// (In a mutex only so that the agent is `Sync`: the stream is used by one task.)
    watching: std::sync::Mutex<Option<(Client, Watching)>>,
}

type Watching =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<WatchMessage, ClientError>> + Send>>;

fn key_pkcs8(pem: &str) -> Result<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    Ok(p.contents)
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// A signing request for `key`.
fn csr(key: &rcgen::KeyPair) -> Result<String> {
    Ok(rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(key)?
        .pem()?)
}

fn peers_of(
    paths: &Paths,
    me: &str,
    directory: &BTreeMap<String, DirectoryEntry>,
) -> Result<Vec<PeerConfig>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.peers)
        .with_context(|| format!("cannot create {}", paths.peers.display()))?;
    let mut out = Vec::new();
    for e in directory.values().filter(|e| e.name != me) {
        let Some(tunnel) = e.tunnel else { continue };
        let cert = paths.peer_cert(&e.name);
        write_private(&cert, e.cert_pem.as_bytes())?;
        out.push(PeerConfig {
            name: e.name.clone(),
            tunnel,
            serves: e.serves.clone(),
            cert: Some(cert),
            api: e.api,
            api_token_file: None,
            workloads: e.workloads.clone(),
        });
    }
    Ok(out)
}

/// Prepares `config` from the control plane (cache, else enrolment) and returns the agent
/// that keeps it current; `None` without `[control]`.
pub async fn bootstrap(config: &mut Config) -> Result<Option<Agent>> {
    let Some(cc) = config.control.clone() else {
        return Ok(None);
    };
    let paths = Paths::new(&cc.state_dir);
    private_dir(&paths.dir)?;
    let ca_pem = std::fs::read_to_string(&cc.ca)
        .with_context(|| format!("control.ca: cannot read {}", cc.ca.display()))?;
    let (key_pkcs8, cert_pem) = if paths.cert.exists() && paths.key.exists() {
        let key = std::fs::read_to_string(&paths.key)
            .with_context(|| format!("cannot read {}", paths.key.display()))?;
        let cert = std::fs::read_to_string(&paths.cert)
            .with_context(|| format!("cannot read {}", paths.cert.display()))?;
        let c = certified(&cert)?;
        if c.name != config.name {
            bail!(
                "{}: the cached certificate is for enforcer {:?}, this one is {:?}",
                paths.cert.display(),
                c.name,
                config.name
            );
        }
        if c.not_after_ms <= unix_ms(SystemTime::now()) {
            tracing::error!(
                cert = %paths.cert.display(),
                "the cached certificate has expired and cannot be renewed: peers refuse this \
                 enforcer (new connections fail closed) until it is enrolled again"
            );
        } else {
            tracing::info!(cert = %paths.cert.display(), scope = %c.scope, "starting from the cached identity");
        }
        (key_pkcs8(&key)?, cert)
    } else {
        enrol(&cc, &config.name, &ca_pem, &paths).await?
    };
    let directory: BTreeMap<String, DirectoryEntry> = match std::fs::read(&paths.directory) {
        Ok(b) => serde_json::from_slice::<Vec<DirectoryEntry>>(&b)
            .with_context(|| format!("{}: unreadable", paths.directory.display()))?
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let policy_version = match std::fs::read(&paths.policy_meta) {
        Ok(b) => serde_json::from_slice::<PolicyVersion>(&b)
            .map(|p| p.version)
            .unwrap_or(0),
        Err(_) => 0,
    };
    if !paths.policy.exists() {
        write_private(&paths.policy, NO_POLICY_YET.as_bytes())?;
    }
    let advertise = cc
        .advertise
        .or_else(|| (!config.listen.tunnel.ip().is_unspecified()).then_some(config.listen.tunnel));
    let serves = Serves {
        tunnel: advertise,
        serves: cc.serves.clone(),
        api: config.flows.api.parse().ok(),
        workloads: config.workloads.iter().map(|w| w.name.clone()).collect(),
        labels: config
            .workloads
            .iter()
            .filter(|w| !w.labels.is_empty())
            .map(|w| (w.name.clone(), w.labels.clone()))
            .collect(),
    };
    let mut agent = Agent {
        config: cc,
        name: config.name.clone(),
        paths,
        key_pkcs8,
        cert_pem,
        ca_pem,
        directory,
        policy_version,
        serves,
        map_sent: None,
        watching: Default::default(),
    };
    // Before anything serves, the directory and policy as they are now, when the server
    // answers: a peer that saw this enforcer join dials it at once and must be admitted,
    // and the first connections must be decided under the policy in force.
    agent.first_snapshot().await;
    // The rest of the enforcer reads the control plane's state as configuration.
    config.tls = crate::config::Tls {
        ca: agent.paths.ca.clone(),
        cert: agent.paths.cert.clone(),
        key: agent.paths.key.clone(),
    };
    config.peers = peers_of(&agent.paths, &config.name, &agent.directory)?;
    config.policy.file = Some(agent.paths.policy.clone());
    Ok(Some(agent))
}

fn certified(cert_pem: &str) -> Result<authority::Certified> {
    let der = authority::pem_der(cert_pem).map_err(anyhow::Error::msg)?;
    Ok(authority::certified(&der)?)
}

/// First start: a new key, and the credential from the configuration.
async fn enrol(
    cc: &ControlConfig,
    name: &str,
    ca_pem: &str,
    paths: &Paths,
) -> Result<(Vec<u8>, String)> {
    let credential = if let Some(f) = &cc.join_token_file {
        let token = tessera_control::admin::read_file(f)
            .map_err(|e| anyhow::anyhow!("control.join_token_file: {e}"))?;
        Credential::Token(token)
    } else if let Some(f) = &cc.identity_document_file {
        let text = std::fs::read_to_string(f).with_context(|| {
            format!(
                "control.identity_document_file: cannot read {}",
                f.display()
            )
        })?;
        let document: SignedDocument = serde_json::from_str(&text).with_context(|| {
            format!(
                "control.identity_document_file: {}: not a signed document",
                f.display()
            )
        })?;
        Credential::Document {
            document,
            instance: cc.instance_id.clone().unwrap_or_default(),
        }
    } else {
        bail!(
            "control: not enrolled yet ({} has no certificate) and no join_token_file or \
             identity_document_file to enrol with",
            paths.dir.display()
        );
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let req = EnrolRequest {
        name: name.to_string(),
        csr: csr(&key)?,
        credential,
    };
    let client = Client::new(&cc.servers, ca_pem, None)?;
    let mut delay = Duration::from_millis(500);
    let enrolment = loop {
        match client.enrol(&req).await {
            Ok(e) => break e,
            // The server is not up yet, or asks us to slow down: try again for a while.
            Err(e) if e.retryable() && delay < Duration::from_secs(20) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "enrolment");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(anyhow::anyhow!("enrolment refused: {e}")),
        }
    };
    save_identity(paths, &key.serialize_der(), &enrolment)?;
    tracing::info!(
        enforcer = %name,
        scope = %enrolment.scope,
        not_after_ms = enrolment.not_after_ms,
        "enrolled with the control plane"
    );
    Ok((key.serialize_der(), enrolment.cert))
}

fn save_identity(paths: &Paths, key_pkcs8: &[u8], e: &Enrolment) -> Result<()> {
    write_private(&paths.key, pem("PRIVATE KEY", key_pkcs8).as_bytes())?;
    write_private(&paths.ca, e.ca.as_bytes())?;
    write_private(&paths.cert, e.cert.as_bytes())
}

impl Agent {
    /// Opens the watch and takes its snapshot into the cache (within a few seconds, else
    /// the cache stays as it is: fail static).
    async fn first_snapshot(&mut self) {
        let attempt = async {
            let client = self.client()?;
            let (server, stream) = client.watch().await?;
            let mut stream: Watching = Box::pin(stream);
            match futures_util::StreamExt::next(&mut stream).await {
                Some(Ok(WatchMessage::Snapshot {
                    directory, policy, ..
                })) => Ok((client, stream, directory, policy)),
                Some(Err(e)) => Err(e),
                other => Err(ClientError::Protocol {
                    server,
                    error: format!("the watch did not start with a snapshot: {other:?}"),
                }),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok((client, stream, directory, policy))) => {
                self.directory = directory.into_iter().map(|e| (e.name.clone(), e)).collect();
                if let Err(e) = self.save_directory() {
                    tracing::warn!(error = format!("{e:#}"), "directory cache not written");
                }
                if let Some(p) = policy.filter(|p| p.version > self.policy_version) {
                    match tessera_policy::load(
                        &format!("control plane policy v{}", p.version),
                        &p.text,
                    ) {
                        Ok(_) => self.save_policy(&p),
                        Err(e) => {
                            tracing::error!(version = p.version, error = %e, "policy from the control plane refused: the cached one stays")
                        }
                    }
                }
                // What we serve, known to peers before we serve it (they admit our tunnels
                // from the moment they see us).
                self.report(&client).await;
                tracing::info!(
                    peers = self.directory.len(),
                    policy_version = self.policy_version,
                    "directory and policy from the control plane"
                );
                *self.watching.get_mut().unwrap_or_else(|e| e.into_inner()) =
                    Some((client, stream));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "control plane unreachable at start-up: starting from the cache")
            }
            Err(_) => tracing::warn!("control plane slow at start-up: starting from the cache"),
        }
    }

    fn save_policy(&mut self, p: &PolicyVersion) {
        self.policy_version = p.version;
        let saved = write_private(&self.paths.policy, p.text.as_bytes())
            .and_then(|_| write_private(&self.paths.policy_meta, &serde_json::to_vec(p)?));
        if let Err(e) = saved {
            tracing::warn!(error = format!("{e:#}"), "policy cache not written");
        }
    }

    fn client(&self) -> Result<Client, ClientError> {
        Client::new(
            &self.config.servers,
            &self.ca_pem,
            Some(Identity {
                cert_pem: &self.cert_pem,
                key_pkcs8: &self.key_pkcs8,
            }),
        )
    }

    /// When to renew: at half the certificate's remaining life from issue, ±10 %.
    fn renew_at(&self) -> SystemTime {
        let Ok(c) = certified(&self.cert_pem) else {
            return SystemTime::now();
        };
        let until = SystemTime::UNIX_EPOCH + Duration::from_millis(c.not_after_ms);
        let life = until
            .duration_since(SystemTime::UNIX_EPOCH + Duration::from_millis(c.not_before_ms))
            .unwrap_or_default();
        let frac = rand::rng().random_range(0.4..0.6);
        (until - life.mul_f64(1.0 - frac)).max(SystemTime::now())
    }

    fn save_directory(&self) -> Result<()> {
        let list: Vec<_> = self.directory.values().cloned().collect();
        write_private(&self.paths.directory, &serde_json::to_vec(&list)?)
    }

    fn push_peers(&self, apply: &dyn Apply) {
        match peers_of(&self.paths, &self.name, &self.directory) {
            Ok(peers) => apply.peers(&peers),
            Err(e) => tracing::error!(error = format!("{e:#}"), "directory not applied"),
        }
        if let Err(e) = self.save_directory() {
            tracing::warn!(error = format!("{e:#}"), "directory cache not written");
        }
    }

    fn take_policy(&mut self, p: &PolicyVersion, apply: &dyn Apply) {
        if p.version <= self.policy_version && self.paths.policy.exists() {
            return;
        }
        match apply.policy(p) {
            Ok(()) => {
                self.save_policy(p);
                tracing::info!(version = p.version, by = %p.by, "policy from the control plane in force");
            }
            Err(e) => tracing::error!(
                version = p.version,
                error = format!("{e:#}"),
                "policy from the control plane refused: the previous one stays in force"
            ),
        }
    }

    fn handle(&mut self, m: WatchMessage, apply: &dyn Apply) -> bool {
        match m {
            WatchMessage::Snapshot {
                directory, policy, ..
            } => {
                self.directory = directory.into_iter().map(|e| (e.name.clone(), e)).collect();
                self.push_peers(apply);
                if let Some(p) = policy {
                    self.take_policy(&p, apply);
                }
            }
            WatchMessage::Upsert { entry, .. } => {
                tracing::info!(peer = %entry.name, tunnel = ?entry.tunnel, "directory: enforcer joined or changed");
                self.directory.insert(entry.name.clone(), entry);
                self.push_peers(apply);
            }
            WatchMessage::Remove { name, .. } => {
                tracing::warn!(peer = %name, "directory: enforcer removed");
                self.directory.remove(&name);
                self.push_peers(apply);
            }
            WatchMessage::Policy { policy, .. } => self.take_policy(&policy, apply),
            WatchMessage::Ping { .. } => {}
            WatchMessage::Revoked { name } => {
                tracing::error!(enforcer = %name, "this enforcer was revoked by the control plane: peers refuse it; it will not renew");
                return false;
            }
        }
        true
    }

    async fn renew(&mut self, apply: &dyn Apply) -> Result<()> {
        let key = rcgen::KeyPair::try_from(self.key_pkcs8.as_slice())?;
        let e = self.client()?.renew(&csr(&key)?).await?;
        apply.certificate(&e.cert)?;
        save_identity(&self.paths, &self.key_pkcs8, &e)?;
        self.cert_pem = e.cert;
        tracing::info!(not_after_ms = e.not_after_ms, "certificate renewed");
        Ok(())
    }

    /// Follows the control plane until the process ends (or this enforcer is revoked).
    pub async fn run(mut self, apply: Arc<dyn Apply>) {
        let mut backoff = Duration::from_millis(250);
        let mut renew_at = self.renew_at();
        let mut revoked = false;
        loop {
            // A watch session: snapshot, then changes, until it breaks.
            let opened = self
                .watching
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let session = async {
                if let Some(w) = opened {
                    return Ok(w);
                }
                let client = self.client()?;
                let (server, stream) = client.watch().await?;
                tracing::info!(%server, "following the control plane");
                let stream: Watching = Box::pin(stream);
                Ok::<_, ClientError>((client, stream))
            };
            let (client, stream) = match session.await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "control plane unreachable: enforcing with the cached directory and policy");
                    if self.renew_due(&mut renew_at, &*apply).await {
                        continue;
                    }
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(250);
            self.report_all(&client, &*apply).await;
            let mut stream = stream;
            let mut report = tokio::time::interval(Duration::from_secs(self.config.report_secs));
            report.tick().await;
            loop {
                let wait_renew = tokio::time::sleep(
                    renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default(),
                );
                tokio::select! {
                    m = futures_util::StreamExt::next(&mut stream) => match m {
                        Some(Ok(m)) => {
                            if !self.handle(m, &*apply) {
                                revoked = true;
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "control plane watch broke");
                            break;
                        }
                        None => {
                            tracing::warn!("control plane watch ended");
                            break;
                        }
                    },
                    _ = report.tick() => self.report_all(&client, &*apply).await,
                    _ = wait_renew => {
                        if self.renew_due(&mut renew_at, &*apply).await {
                            // New certificate: a new session presents it.
                            break;
                        }
                    }
                }
            }
            if revoked {
                return;
            }
            tokio::time::sleep(jitter(backoff)).await;
        }
    }

    /// Renews if it is time; whether a new certificate is in use.
    async fn renew_due(&mut self, renew_at: &mut SystemTime, apply: &dyn Apply) -> bool {
        if SystemTime::now() < *renew_at {
            return false;
        }
        match self.renew(apply).await {
            Ok(()) => {
                *renew_at = self.renew_at();
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "certificate renewal failed; retrying"
                );
                *renew_at = SystemTime::now() + jitter(Duration::from_secs(2));
                false
            }
        }
    }

    /// Reports what it serves and the policy in force.
    async fn report(&self, client: &Client) {
        if let Err(e) = client.report(&self.serves, self.policy_version).await {
            tracing::warn!(error = %e, "report to the control plane failed");
        }
    }

    /// Reports as [`Agent::report`] does, and sends its map if it changed since last sent.
    async fn report_all(&mut self, client: &Client, apply: &dyn Apply) {
        self.report(client).await;
        let map = apply.map();
        let digest: [u8; 32] =
            <sha2::Sha256 as sha2::Digest>::digest(serde_json::to_vec(&map).unwrap_or_default())
                .into();
        if self.map_sent == Some(digest) {
            return;
        }
        match client.report_map(&map).await {
            Ok(()) => {
                self.map_sent = Some(digest);
                tracing::debug!(edges = map.edges.len(), "map sent to the control plane");
            }
            Err(e) => tracing::warn!(error = %e, "sending the map to the control plane failed"),
        }
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}
