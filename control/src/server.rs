//! The control plane's HTTPS server: the [`crate::api`] routes over the [`ControlPlane`].
//!
//! TLS is terminated here with the authority's own certificate; a client certificate is
//! optional at the TLS layer (enrolment has none yet) and required by every route but
//! enrolment and the admin routes, which take a bearer token instead. Each connection's
//! verified certificate is read once and handed to the routes; a route also checks that it
//! is the enforcer's *current* certificate, so a revoked or superseded one gets nothing even
//! before it expires. Connections are bounded in number and in handshake time.
use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    admin::{self, AdminError},
    api::{self, ErrorBody, WatchMessage},
    authority::{Certified, certified},
    feed::{Feed, Line},
    plane::{ControlPlane, EnrolError, EnrolRequest},
    policy::{self, PolicyError},
    registry::{self, RegistryError},
    store::StoreError,
    tokens::{self, TokenError},
};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16_384;
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Watch streams say they are alive this often.
pub const PING: Duration = Duration::from_secs(5);
const SMALL_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Authority(#[from] crate::authority::AuthorityError),
}

/// The server's TLS configuration: a certificate for `names` from the authority, client
/// certificates verified against the same CA when presented.
pub fn tls_config(
    plane: &ControlPlane,
    names: &[String],
) -> Result<Arc<ServerConfig>, ServerError> {
    let (cert, key) = plane.authority().issue_server(
        names,
        Duration::from_secs(365 * 24 * 3600),
        SystemTime::now(),
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(plane.authority().ca_der().to_vec()))
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of a connection.
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    cert: Option<Arc<Certified>>,
}

struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, error: impl ToString) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.to_string(),
                retryable: status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(s) => s.into(),
            RegistryError::Unknown(_) => ApiError::new(StatusCode::NOT_FOUND, e),
            RegistryError::Revoked(_) => ApiError::new(StatusCode::FORBIDDEN, e),
            RegistryError::Taken(_) | RegistryError::Overlap { .. } => {
                ApiError::new(StatusCode::CONFLICT, e)
            }
            RegistryError::Invalid { .. } => ApiError::new(StatusCode::BAD_REQUEST, e),
            RegistryError::Corrupt(..) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    }
}

impl From<EnrolError> for ApiError {
    fn from(e: EnrolError) -> Self {
        match e {
            EnrolError::RateLimited(_) | EnrolError::Busy => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, e)
            }
            EnrolError::Store(s) => s.into(),
            EnrolError::Registry(r) => r.into(),
            EnrolError::Token(TokenError::Store(s)) => s.into(),
            EnrolError::Authority(_) => ApiError::new(StatusCode::BAD_REQUEST, e),
            _ => ApiError::new(StatusCode::FORBIDDEN, e),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Store(s) => s.into(),
            e => ApiError::new(StatusCode::UNAUTHORIZED, e),
        }
    }
}

impl Peer {
    fn enforcer(&self) -> Result<&Certified, ApiError> {
        self.cert.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this route needs an enforcer certificate (mutual TLS)",
            )
        })
    }
}

async fn require_admin(plane: &ControlPlane, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "administrator token required"))?;
    Ok(admin::check(plane.store(), token).await?)
}

type AppState = Arc<ControlPlane>;

async fn enrol(
    State(plane): State<AppState>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<EnrolRequest>,
) -> Result<Json<crate::plane::Enrolment>, ApiError> {
    match plane.enrol(peer.addr.ip(), &req, SystemTime::now()).await {
        Ok(e) => Ok(Json(e)),
        Err(e) => {
            tracing::warn!(from = %peer.addr, enforcer = %req.name, error = %e, "enrolment refused");
            Err(e.into())
        }
    }
}

async fn renew(
    State(plane): State<AppState>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<api::RenewRequest>,
) -> Result<Json<crate::plane::Enrolment>, ApiError> {
    let cert = peer.enforcer()?;
    Ok(Json(plane.renew(cert, &req.csr, SystemTime::now()).await?))
}

async fn report(
    State(plane): State<AppState>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<api::ReportRequest>,
) -> Result<StatusCode, ApiError> {
    let cert = peer.enforcer()?;
    plane
        .report(cert, &req.serves, req.policy_version, SystemTime::now())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An enforcer's own map, kept as its latest (see [`crate::fleet`]).
async fn map(
    State(plane): State<AppState>,
    Extension(peer): Extension<Peer>,
    Json(m): Json<crate::fleet::WireMap>,
) -> Result<StatusCode, ApiError> {
    let cert = peer.enforcer()?;
    plane.check_enforcer(cert).await?;
    crate::fleet::ingest(
        plane.store(),
        &cert.name,
        m.into(),
        crate::authority::unix_ms(SystemTime::now()),
    )
    .await
    .map_err(|e| match e {
        crate::fleet::FleetError::Store(s) => s.into(),
        e => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// The policy in force (404 before the first).
async fn current_policy(
    State(plane): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<crate::policy::PolicyVersion>, ApiError> {
    require_admin(&plane, &headers).await?;
    match policy::current(plane.store()).await {
        Ok(Some(p)) => Ok(Json(p)),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no policy applied yet",
        )),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// The fleet's map (JSON made again only when a report changed).
async fn fleet_map(
    State(plane): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&plane, &headers).await?;
    let body = plane.fleet_map_json().await.map_err(|e| match e {
        crate::fleet::FleetError::Store(s) => s.into(),
        e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e),
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    ))
}

fn line(m: &WatchMessage) -> bytes::Bytes {
    crate::feed::line(m)
}

/// The watch stream: the server's feed's snapshot, then its changes (see [`crate::feed`]).
async fn watch(
    State(plane): State<AppState>,
    Extension(peer): Extension<Peer>,
    Extension(feed): Extension<Arc<Feed>>,
) -> Result<Response, ApiError> {
    let cert = peer.enforcer()?;
    plane.check_enforcer(cert).await?;
    let Some(sub) = feed.subscribe() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control plane is reconnecting to its store: watch again shortly",
        ));
    };
    // A revocation between the check above and the subscription would be in neither the
    // changes nor the answer: check again, now that the changes are followed.
    plane.check_enforcer(cert).await?;
    let mut changes = sub.changes;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(256);
    tx.send(Ok(sub.snapshot)).await.ok();
    let who = cert.name.clone();
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING);
        ping.tick().await;
        loop {
            let out = tokio::select! {
                l = changes.recv() => match l {
                    Ok(Line::Message { left: Some(name), .. }) if name == who => {
                        // The watcher itself was revoked or removed: say so and end.
                        tx.send(Ok(line(&WatchMessage::Revoked { name }))).await.ok();
                        break;
                    }
                    Ok(Line::Message { line, .. }) => line,
                    Ok(Line::Reset) => {
                        tracing::warn!(enforcer = %who, "watch ended: the server lost its store");
                        break;
                    }
                    Err(e) => {
                        // Lagged: end the stream; the enforcer watches anew and gets a
                        // fresh snapshot.
                        tracing::warn!(enforcer = %who, error = %e, "watch ended");
                        break;
                    }
                },
                _ = ping.tick() => line(&WatchMessage::Ping { revision: feed.revision() }),
                _ = tx.closed() => break,
            };
            if tx.send(Ok(out)).await.is_err() {
                break;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn create_token(
    State(plane): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<api::TokenRequest>,
) -> Result<Json<api::TokenResponse>, ApiError> {
    let by = require_admin(&plane, &headers).await?;
    let now = crate::authority::unix_ms(SystemTime::now());
    let t = tokens::create(
        plane.store(),
        &req.scope,
        Duration::from_secs(req.ttl_s),
        now,
    )
    .await
    .map_err(|e| match e {
        TokenError::Store(s) => s.into(),
        e => ApiError::new(StatusCode::BAD_REQUEST, e),
    })?;
    tracing::info!(admin = %by, token = %t.id, scope = %req.scope, "join token created");
    Ok(Json(api::TokenResponse {
        token: t.secret,
        id: t.id,
        expires_ms: t.expires_ms,
    }))
}

async fn apply_policy(
    State(plane): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<api::PolicyRequest>,
) -> Result<Json<policy::PolicyVersion>, ApiError> {
    let by = require_admin(&plane, &headers).await?;
    let now = crate::authority::unix_ms(SystemTime::now());
    let v = policy::apply(plane.store(), &req.file, &req.text, &by, now)
        .await
        .map_err(|e| match e {
            PolicyError::Store(s) => s.into(),
            PolicyError::Contended => ApiError::new(StatusCode::CONFLICT, e),
            e => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e),
        })?;
    tracing::info!(admin = %by, version = v.version, "policy applied");
    Ok(Json(v))
}

async fn status(
    State(plane): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<api::Status>, ApiError> {
    require_admin(&plane, &headers).await?;
    let enforcers = registry::all(plane.store())
        .await?
        .iter()
        .map(api::EnforcerStatus::from)
        .collect();
    let policy_version = policy::current(plane.store())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_or(0, |p| p.version);
    Ok(Json(api::Status {
        enforcers,
        policy_version,
    }))
}

async fn revoke(
    State(plane): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let by = require_admin(&plane, &headers).await?;
    plane.revoke(&name, SystemTime::now()).await?;
    tracing::warn!(admin = %by, enforcer = %name, "enforcer revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn remove(
    State(plane): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let by = require_admin(&plane, &headers).await?;
    plane.remove(&name).await?;
    tracing::warn!(admin = %by, enforcer = %name, "enforcer removed");
    Ok(StatusCode::NO_CONTENT)
}

/// The routes.
pub fn router(plane: Arc<ControlPlane>) -> Router {
    Router::new()
        .route(api::ENROL, post(enrol))
        .route(api::RENEW, post(renew))
        .route(api::REPORT, post(report))
        .route(api::WATCH, get(watch))
        .route(api::ADMIN_TOKENS, post(create_token))
        .route(api::ADMIN_STATUS, get(status))
        .route(api::ADMIN_MAP, get(fleet_map))
        .route(
            &format!("{}/{{name}}/revoke", api::ADMIN_ENFORCERS),
            post(revoke),
        )
        .route(
            &format!("{}/{{name}}", api::ADMIN_ENFORCERS),
            delete(remove),
        )
        .layer(DefaultBodyLimit::max(SMALL_BODY))
        // The policy route alone takes large bodies.
        .merge(
            Router::new()
                .route(api::ADMIN_POLICY, post(apply_policy).get(current_policy))
                .layer(DefaultBodyLimit::max(policy::MAX_SIZE * 2 + SMALL_BODY)),
        )
        // ...and the map route, bounded by the fleet's own limits.
        .merge(
            Router::new()
                .route(api::MAP, post(map))
                .layer(DefaultBodyLimit::max(crate::fleet::MAX_BODY)),
        )
        .with_state(plane)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    plane: Arc<ControlPlane>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // One store watch for every stream this server serves; it stops with the server.
    let (feed, _feed_task) = Feed::start(plane.clone().store_arc()).await;
    let routes = router(plane).layer(Extension(feed));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(from = %addr, "too many connections: refused");
            continue;
        };
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(from = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(from = %addr, "TLS handshake timed out");
                    return;
                }
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| match certified(c.as_ref()) {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        tracing::warn!(from = %addr, error = %e, "client certificate is not an enforcer's");
                        None
                    }
                });
            let svc = routes.layer(Extension(Peer { addr, cert }));
            let svc = TowerToHyperService::new(svc);
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(from = %addr, error = %e, "connection ended");
            }
        });
    }
}
