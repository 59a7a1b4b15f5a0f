//! `tessera server`: the control plane daemon and its administration commands.
//!
//! The daemon keeps everything in its state directory (0700): the store (`control.redb`,
//! 0600, which holds the CA key), `ca.pem` (the CA certificate enforcers and
//! administrators trust; public) and, made on first start, `admin.token` (0600: whoever
//! can read it administers the control plane). The administration commands talk to a
//! running server over its API with that token, so they work from another machine too.
//!
//! With `--store etcd://host:port[,host:port...][/prefix]` the state lives in etcd instead
//! (the state directory then keeps only `ca.pem` and `admin.token`), so that several
//! servers share it: see docs/control-plane.md.
use std::{
    net::SocketAddr,
    num::NonZeroU32,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use tessera_control::{
    admin,
    authority::unix_ms,
    client::Client,
    document::{self, DocumentPolicy, InstanceDocument, Provider},
    plane::{ControlPlane, Settings},
    scope::Scope,
    server,
    store::{Embedded, Store},
    tokens,
};

pub const STORE_FILE: &str = "control.redb";
pub const CA_FILE: &str = "ca.pem";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/server";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15100";

/// `tessera server run`'s settings.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    /// `etcd://...`: the store is in etcd; `None`: the embedded file in `state_dir`.
    pub store: Option<String>,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// Names (DNS or IP) the server's certificate carries: what enforcers dial.
    pub names: Vec<String>,
    pub lifetime: Duration,
    /// Provider certificates (PEM) whose identity documents enrol enforcers.
    pub document_trust: Option<PathBuf>,
    pub document_max_age: Duration,
    pub scope_tags: Vec<String>,
    pub enrol_per_source: u32,
    /// Written once the server is serving.
    pub ready_file: Option<PathBuf>,
    /// TLS to etcd (`--store etcds://...`): the CA, the client certificate, its key (0600).
    pub etcd_tls: Option<[PathBuf; 3]>,
    /// Serve the fleet map's web page (read-only) on this address ([`crate::fleetview`]).
    pub map_listen: Option<SocketAddr>,
    /// The bearer token (file, 0600) browsers must send to the map page; required off
    /// loopback.
    pub map_token_file: Option<PathBuf>,
}

fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{}: mode {:o}: the control plane's state must be private (chmod 700)",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// The embedded store in the state directory, or etcd if `--store` names it.
async fn open_store(o: &RunOptions) -> Result<Arc<dyn Store>> {
    let Some(url) = &o.store else {
        if o.etcd_tls.is_some() {
            bail!(
                "--etcd-ca/--etcd-cert/--etcd-key without --store etcds://...: nothing would use them"
            );
        }
        return Ok(Arc::new(Embedded::open(&o.state_dir.join(STORE_FILE))?));
    };
    open_etcd(url, o.etcd_tls.as_ref()).await
}

#[cfg(feature = "etcd")]
async fn open_etcd(url: &str, tls: Option<&[PathBuf; 3]>) -> Result<Arc<dyn Store>> {
    use tessera_control::etcd::{EtcdStore, EtcdTls, EtcdUrl};
    let url: EtcdUrl = url.parse().context("--store")?;
    let tls = match tls {
        Some([ca, cert, key]) => {
            let read = |flag: &str, path: &Path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("{flag}: cannot read {}", path.display()))
            };
            let mode = std::fs::metadata(key)
                .with_context(|| format!("--etcd-key: cannot read {}", key.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                bail!(
                    "--etcd-key {}: mode {:o}: the key to the store (which holds the CA key) \
                     must be private (chmod 600)",
                    key.display(),
                    mode & 0o777
                );
            }
            Some(EtcdTls {
                ca_pem: read("--etcd-ca", ca)?,
                cert_pem: read("--etcd-cert", cert)?,
                key_pem: read("--etcd-key", key)?,
            })
        }
        None => None,
    };
    let store = EtcdStore::connect_with(&url, tls.as_ref())
        .await
        .with_context(|| format!("--store {url}: cannot reach etcd"))?;
    tracing::info!(store = %url, "store: etcd");
    Ok(Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(url: &str, _tls: Option<&[PathBuf; 3]>) -> Result<Arc<dyn Store>> {
    bail!("--store {url}: this build has no etcd support (built without the `etcd` feature)")
}

/// Runs the control plane until SIGTERM or SIGINT.
pub async fn run(o: RunOptions) -> Result<()> {
    private_dir(&o.state_dir)?;
    // One descriptor per enforcer's watch stream (up to server::MAX_CONNECTIONS).
    crate::daemon::raise_fd_limit();
    let store = open_store(&o).await?;
    let mut settings = Settings::new(&o.trust_domain);
    settings.lifetime = o.lifetime;
    settings.enrol_per_source =
        NonZeroU32::new(o.enrol_per_source).context("--enrol-rate must be at least 1")?;
    if let Some(path) = &o.document_trust {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("--document-trust: cannot read {}", path.display()))?;
        settings.documents = Some(
            DocumentPolicy::from_pem(&pem, o.document_max_age, o.scope_tags.clone())
                .map_err(|e| anyhow::anyhow!("--document-trust: {}: {e}", path.display()))?,
        );
    }
    let plane = Arc::new(ControlPlane::new(store.clone(), settings).await?);
    let ca_path = o.state_dir.join(CA_FILE);
    std::fs::write(&ca_path, plane.authority().ca_pem())
        .with_context(|| format!("cannot write {}", ca_path.display()))?;
    let admin_path = o.state_dir.join(ADMIN_TOKEN_FILE);
    if !admin_path.exists() {
        let token = admin::create(plane.store(), "admin", unix_ms(SystemTime::now())).await?;
        admin::write_file(&admin_path, &token)?;
        tracing::info!(file = %admin_path.display(), "administrator token written");
    }
    let mut names = o.names.clone();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
        let ip = o.listen.ip().to_string();
        if !o.listen.ip().is_unspecified() && !names.contains(&ip) {
            names.push(ip);
        }
    }
    let tls = server::tls_config(&plane, &names)?;
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {}", o.listen))?;
    if let Some(addr) = o.map_listen {
        let token = match &o.map_token_file {
            Some(f) => Some(
                crate::api::read_token_file(f)
                    .map_err(|e| anyhow::anyhow!("--map-token-file: {e}"))?,
            ),
            None => None,
        };
        let routes = crate::fleetview::store_router(store.clone(), addr, token.as_deref(), None)?;
        let page = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--map-listen: cannot listen on {addr}"))?;
        tracing::info!(listen = %addr, token = token.is_some(), "fleet map page: open http://{addr}/");
        tokio::spawn(crate::fleetview::serve_limited(page, routes));
    }
    let prune_plane = plane.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(600));
        loop {
            every.tick().await;
            match tokens::prune(prune_plane.store(), unix_ms(SystemTime::now())).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(tokens = n, "forgot used and expired join tokens"),
                Err(e) => tracing::warn!(error = %e, "pruning join tokens"),
            }
        }
    });
    tracing::info!(
        listen = %o.listen,
        names = ?names,
        trust_domain = %o.trust_domain,
        lifetime_s = o.lifetime.as_secs(),
        documents = o.document_trust.is_some(),
        state = %o.state_dir.display(),
        store = o.store.as_deref().unwrap_or("embedded"),
        "control plane ready"
    );
    if let Some(f) = &o.ready_file {
        std::fs::write(f, format!("{}\n", std::process::id()))
            .with_context(|| format!("--ready-file: cannot write {}", f.display()))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    server::serve(listener, tls, plane, stop).await?;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Where an administration command finds the server and its credential.
#[derive(Clone, Debug)]
pub struct AdminTarget {
    pub servers: Vec<String>,
    pub ca: PathBuf,
    pub admin_token_file: PathBuf,
}

impl AdminTarget {
    fn connect(&self) -> Result<(Client, String)> {
        let ca = std::fs::read_to_string(&self.ca)
            .with_context(|| format!("--ca: cannot read {}", self.ca.display()))?;
        let token = admin::read_file(&self.admin_token_file)?;
        Ok((Client::new(&self.servers, &ca, None)?, token))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `tessera server token create`: prints the token (only) on stdout.
pub fn token_create(t: &AdminTarget, scope: &str, ttl: Duration) -> Result<String> {
    let scope: Scope = scope.parse().context("--scope")?;
    let (client, admin) = t.connect()?;
    let r = runtime()?.block_on(client.create_token(&admin, &scope, ttl))?;
    eprintln!(
        "join token {} for one enforcer{}, valid for {} s",
        r.id,
        if scope.is_empty() {
            String::new()
        } else {
            format!(" in scope {scope}")
        },
        ttl.as_secs()
    );
    Ok(r.token)
}

/// `tessera server status`: one line per enforcer.
pub fn status(t: &AdminTarget, json: bool) -> Result<String> {
    let (client, admin) = t.connect()?;
    let s = runtime()?.block_on(client.status(&admin))?;
    if json {
        return Ok(serde_json::to_string_pretty(&s)?);
    }
    let now = unix_ms(SystemTime::now());
    let mut out = format!("policy version {}\n", s.policy_version);
    out.push_str(&format!(
        "{:<16} {:<8} {:<28} {:<22} {:<14} {:<7} {}\n",
        "ENFORCER", "STATE", "SCOPE", "TUNNEL", "CERT EXPIRES", "POLICY", "LAST SEEN"
    ));
    for e in &s.enforcers {
        let state = match e.state {
            tessera_control::registry::State::Active => "active",
            tessera_control::registry::State::Revoked => "revoked",
            tessera_control::registry::State::Enrolling => "enrolling",
        };
        let expires = if e.cert_not_after_ms > now {
            format!("in {} s", (e.cert_not_after_ms - now) / 1000)
        } else {
            "expired".into()
        };
        out.push_str(&format!(
            "{:<16} {:<8} {:<28} {:<22} {:<14} {:<7} {} s ago\n",
            e.name,
            state,
            if e.scope.is_empty() {
                "-".to_string()
            } else {
                e.scope.to_string()
            },
            e.serves
                .tunnel
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            expires,
            e.policy_version,
            now.saturating_sub(e.last_seen_ms) / 1000
        ));
    }
    Ok(out)
}

/// `tessera map --server URL`: the fleet's map (every enforcer's latest, merged).
pub fn fleet_map(t: &AdminTarget) -> Result<tessera_proxy::map::Map> {
    let (client, admin) = t.connect()?;
    Ok(runtime()?.block_on(client.fleet_map(&admin))?)
}

/// `tessera policy suggest`: an allow policy from the fleet's map of the last `since`,
/// each rule compared with the policy in force.
pub fn policy_suggest(
    t: &AdminTarget,
    group_by: Vec<String>,
    since: Duration,
) -> Result<tessera_control::suggest::Suggestion> {
    let (client, admin) = t.connect()?;
    let rt = runtime()?;
    let map = rt.block_on(client.fleet_map(&admin))?;
    let in_force = match rt.block_on(client.current_policy(&admin))? {
        Some(p) => Some(tessera_policy::load(
            &format!("policy version {}", p.version),
            &p.text,
        )?),
        None => None,
    };
    let since_ms = unix_ms(SystemTime::now()).saturating_sub(since.as_millis() as u64);
    Ok(tessera_control::suggest::suggest(
        &map,
        &tessera_control::suggest::Options {
            group_by,
            since_ms,
            in_force,
        },
    ))
}

/// `tessera server enforcer revoke|remove NAME`.
pub fn enforcer(t: &AdminTarget, name: &str, remove: bool) -> Result<()> {
    let (client, admin) = t.connect()?;
    let rt = runtime()?;
    if remove {
        rt.block_on(client.remove(&admin, name))?;
    } else {
        rt.block_on(client.revoke(&admin, name))?;
    }
    Ok(())
}

/// `tessera policy apply FILE --server URL`: validated at the server; every error with
/// file, line and column, and nothing changes on error.
pub fn policy_apply(t: &AdminTarget, file: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Checked here first too, so that errors show without a round trip.
    tessera_policy::load(&file.display().to_string(), &text)?;
    let (client, admin) = t.connect()?;
    let v = runtime()?.block_on(client.apply_policy(&admin, &file.display().to_string(), &text))?;
    Ok(v.version)
}

/// `tessera server document provider-init DIR`: a "cloud provider" key and certificate
/// for tests and demos (`provider.key` 0600, `provider.pem`).
pub fn provider_init(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    private_dir(dir)?;
    let key = dir.join("provider.key");
    let cert = dir.join("provider.pem");
    if key.exists() {
        bail!("{} exists: refusing to replace it", key.display());
    }
    let (k, c) = document::new_provider("tessera-demo-cloud", 3650).map_err(anyhow::Error::msg)?;
    admin::write_file(&key, k.trim_end())?;
    std::fs::write(&cert, c).with_context(|| format!("cannot write {}", cert.display()))?;
    Ok((key, cert))
}

/// `tessera server document make`: a signed instance identity document (JSON), as a cloud
/// gives its instances, dated now.
pub fn document_make(
    provider_key: &Path,
    instance: &str,
    account: &str,
    region: &str,
    image: &str,
    tags: &[String],
) -> Result<String> {
    let pem = std::fs::read_to_string(provider_key)
        .with_context(|| format!("--provider-key: cannot read {}", provider_key.display()))?;
    let provider = Provider::from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("--provider-key: {}: {e}", provider_key.display()))?;
    let mut t = std::collections::BTreeMap::new();
    for tag in tags {
        let (k, v) = tag
            .split_once('=')
            .with_context(|| format!("--tag {tag:?}: expected key=value"))?;
        t.insert(k.to_string(), v.to_string());
    }
    let doc = InstanceDocument {
        instance_id: instance.into(),
        account_id: account.into(),
        region: region.into(),
        image_id: image.into(),
        tags: t,
        issued_at: unix_ms(SystemTime::now()) / 1000,
    };
    Ok(serde_json::to_string(&provider.sign(&doc))?)
}
