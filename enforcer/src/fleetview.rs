//! `tessera map --server URL --serve 127.0.0.1:PORT`: the fleet's map in a browser.
//!
//! The control plane already merges every enforcer's map (`GET /v1/admin/map`). This
//! viewer serves the enforcer's web map page (the same page and script as [`crate::api`],
//! not a copy) on a local address, with `/api/map` answering the fleet map fetched from
//! the control plane, so the page's filters, details and new-edge marks work on the fleet.
//!
//! Why a local viewer and not the page on the control plane's own port, with the browser
//! holding the administrator token: that token administers the control plane (join tokens,
//! policy, revocation). In a browser it would sit in page memory or storage, reachable by
//! any script, extension or XSS on that origin, and the control plane's fleet-facing port
//! would grow an unauthenticated route (the page) and a browser client it was not built
//! for (its CA is private: browsers warn). Here the token stays where it is, in its 0600
//! file, read by this process, which alone talks to the control plane (over TLS, verifying
//! the control plane's CA) and only ever asks it for the map. The browser gets a read-only
//! view: no route of this viewer reaches anything but the map, and it holds no credential
//! of the control plane at all. A remote analyst reaches it through an SSH tunnel, like any
//! loopback-only admin page.
//!
//! The control server serves the same viewer itself with `tessera server run --map-listen
//! ADDR` ([`store_router`]): there the map comes straight from the store (every replica on
//! one store serves the same fleet map), so no credential of the control plane is involved
//! at all, and the page listens on its own address (loopback by default), never on the
//! port enforcers use.
//!
//! Whoever can reach the page's port can hold connections to it: at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed at accept), a request's headers
//! must arrive within [`HEADER_TIMEOUT`] and a connection lasts at most [`CONN_LIFETIME`], so
//! the page can never take the descriptors the control server's enforcer port needs.
//! Failures of the map's source are cached like answers, so a failing store is asked no
//! more often than a healthy one.
//!
//! Who may ask is [`crate::api::Guard`], as for the enforcer's API: on loopback, only
//! requests addressed to an IP address or `localhost` (DNS rebinding); off loopback a bearer
//! token is required (`--token-file`), compared in constant time. The fleet map is fetched
//! at most once per [`REFRESH`] whatever the page asks, so a page (or many) cannot load the
//! control plane.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    middleware,
    routing::get,
};
use tessera_control::{admin, client::Client, store::Store};
use tokio::sync::Mutex;

use crate::{
    api::{self, Guard, NewAfter},
    map::{self, Map},
};

/// The fleet map is fetched from the control plane at most this often.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Connections served at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it does (the page reconnects).
pub const CONN_LIFETIME: Duration = Duration::from_secs(60);

/// `tessera map --server ... --serve ADDR`.
#[derive(Clone, Debug)]
pub struct Options {
    pub servers: Vec<String>,
    /// The control plane's CA certificate.
    pub ca: PathBuf,
    /// The administrator token file (0600): read here, never sent to the browser.
    pub admin_token_file: PathBuf,
    pub listen: SocketAddr,
    /// The bearer token browsers must send (required off loopback).
    pub token: Option<String>,
    /// The baseline window marking edges new, unless the page asks for another.
    pub new_after: Option<Duration>,
}

/// A fetch of the fleet map: the map, or the answer that says why there is none.
type Fetched = Result<Map, (StatusCode, String)>;

/// Where the viewer's fleet map comes from.
enum Source {
    /// A control plane's admin API (`tessera map --serve`).
    Control { client: Client, admin: String },
    /// The control plane's own store (`tessera server run --map-listen`).
    Store(Arc<dyn Store>),
}

struct Viewer {
    source: Source,
    servers: Vec<String>,
    new_after: Option<Duration>,
    /// The latest fleet map (or why it could not be had) and when it was fetched.
    cache: Mutex<Option<(Instant, Fetched)>>,
}

impl Viewer {
    async fn fleet_map(&self) -> Result<Map, (StatusCode, String)> {
        let mut cache = self.cache.lock().await;
        if let Some((at, m)) = &*cache
            && at.elapsed() < REFRESH
        {
            return m.clone();
        }
        let m = match &self.source {
            Source::Control { client, admin } => client.fleet_map(admin).await.map_err(|e| {
                tracing::warn!(servers = ?self.servers, error = %e, "fleet map");
                (
                    StatusCode::BAD_GATEWAY,
                    format!("the control plane's map: {e}\n"),
                )
            }),
            Source::Store(store) => tessera_control::fleet::fleet_map(store.as_ref())
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "fleet map from the store");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the fleet map: {e}\n"),
                    )
                }),
        };
        *cache = Some((Instant::now(), m.clone()));
        m
    }
}

/// The viewer's routes (behind the [`Guard`]), credentials read and checked.
pub fn router(o: &Options) -> Result<Router> {
    if !api::is_loopback(o.listen) && o.token.is_none() {
        bail!(
            "--serve {}: off loopback the viewer needs --token-file (the bearer token \
             browsers must send); or serve on 127.0.0.1 and reach it through an SSH tunnel",
            o.listen
        );
    }
    let ca = std::fs::read_to_string(&o.ca)
        .with_context(|| format!("--ca: cannot read {}", o.ca.display()))?;
    let admin = admin::read_file(&o.admin_token_file)?;
    let viewer = Viewer {
        source: Source::Control {
            client: Client::new(&o.servers, &ca, None)?,
            admin,
        },
        servers: o.servers.clone(),
        new_after: o.new_after,
        cache: Mutex::new(None),
    };
    Ok(routes(viewer, o.listen, o.token.as_deref()))
}

/// The viewer inside `tessera server run --map-listen LISTEN`: the fleet map read from the
/// control plane's `store`; `token` required off loopback, as for [`router`].
pub fn store_router(
    store: Arc<dyn Store>,
    listen: SocketAddr,
    token: Option<&str>,
    new_after: Option<Duration>,
) -> Result<Router> {
    if !api::is_loopback(listen) && token.is_none() {
        bail!(
            "--map-listen {listen}: off loopback the map page needs --map-token-file (the \
             bearer token browsers must send); or serve it on 127.0.0.1 and reach it through \
             an SSH tunnel"
        );
    }
    let viewer = Viewer {
        source: Source::Store(store),
        servers: vec!["this server".into()],
        new_after,
        cache: Mutex::new(None),
    };
    Ok(routes(viewer, listen, token))
}

fn routes(viewer: Viewer, listen: SocketAddr, token: Option<&str>) -> Router {
    let viewer = Arc::new(viewer);
    let guard = Arc::new(Guard::new(listen, token));
    Router::new()
        .route("/", get(api::page))
        .route("/map.js", get(api::script))
        .route("/api/map", get(fleet_map))
        .route("/api/source", get(source))
        .with_state(viewer)
        .layer(middleware::from_fn_with_state(guard, api::guard))
}

/// `?new_after=` as the page asks (empty: none), else the viewer's `--new-after`.
async fn fleet_map(
    State(v): State<Arc<Viewer>>,
    Query(q): Query<NewAfter>,
) -> Result<Json<Map>, (StatusCode, String)> {
    let window = match &q.new_after {
        Some(_) => q.window_ms()?,
        None => v.new_after.map(|d| d.as_millis() as u64),
    };
    let mut m = v.fleet_map().await?;
    if let Some(w) = window {
        map::mark_new(&mut m, w);
    }
    Ok(Json(m))
}

async fn source(State(v): State<Arc<Viewer>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "kind": "fleet",
        "servers": v.servers,
        "new_after": v.new_after.map(|d| humantime::format_duration(d).to_string()),
    }))
}

/// Serves the viewer until SIGTERM or SIGINT.
pub async fn serve(o: Options) -> Result<()> {
    let routes = router(&o)?;
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("--serve: cannot listen on {}", o.listen))?;
    tracing::info!(
        listen = %o.listen,
        servers = ?o.servers,
        token = o.token.is_some(),
        "fleet map viewer ready: open http://{}/",
        o.listen
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = serve_limited(listener, routes) => {},
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    Ok(())
}

/// Serves `routes` on `listener` within [`MAX_CONNECTIONS`], [`HEADER_TIMEOUT`] and
/// [`CONN_LIFETIME`] (the page's port must not be able to starve its process of
/// descriptors); runs until dropped.
pub async fn serve_limited(listener: tokio::net::TcpListener, routes: Router) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto,
        service::TowerToHyperService,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "map page: accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(from = %addr, "map page: too many connections, closed");
            continue;
        };
        let svc = TowerToHyperService::new(routes.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            if tokio::time::timeout(CONN_LIFETIME, conn).await.is_err() {
                tracing::debug!(from = %addr, "map page: connection closed after its lifetime");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(listen: &str, token: Option<&str>) -> Options {
        Options {
            servers: vec!["https://127.0.0.1:15100".into()],
            ca: "/nonexistent/ca.pem".into(),
            admin_token_file: "/nonexistent/admin.token".into(),
            listen: listen.parse().unwrap(),
            token: token.map(str::to_owned),
            new_after: None,
        }
    }

    #[test]
    fn off_loopback_the_viewer_needs_a_token_of_its_own() {
        let e = router(&options("0.0.0.0:15190", None)).unwrap_err();
        assert!(e.to_string().contains("needs --token-file"), "{e}");
        // With one (or on loopback) it goes on to read the credentials: here missing.
        for o in [
            options("0.0.0.0:15190", Some("0123456789abcdef0123")),
            options("127.0.0.1:15190", None),
        ] {
            let e = router(&o).unwrap_err();
            assert!(e.to_string().contains("--ca: cannot read"), "{e}");
        }
    }

    #[test]
    fn new_after_is_a_duration_or_none() {
        let w = |s: Option<&str>| {
            NewAfter {
                new_after: s.map(str::to_owned),
            }
            .window_ms()
        };
        assert_eq!(w(None).unwrap(), None);
        assert_eq!(w(Some("")).unwrap(), None);
        assert_eq!(w(Some("1h")).unwrap(), Some(3_600_000));
        assert_eq!(w(Some("2s")).unwrap(), Some(2_000));
        let (status, body) = w(Some("soon")).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("new_after: \"soon\""), "{body}");
    }

    /// Held connections (headers never finished) cannot pile up: past [`MAX_CONNECTIONS`]
    /// new ones are closed at once, held ones are closed after [`HEADER_TIMEOUT`], and the
    /// page serves again afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_connections_are_bounded_and_timed_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Router::new().route("/", get(|| async { "ok" }));
        let server = tokio::spawn(serve_limited(listener, routes));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 16 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await
                .unwrap();
            held.push(c);
        }
        // Each connection is closed by the server (EOF or reset) within the header
        // timeout, plus slack for a loaded machine; the extra ones at once.
        let deadline = HEADER_TIMEOUT + Duration::from_secs(5);
        let mut closed = 0;
        for mut c in held {
            let mut buf = [0u8; 256];
            match tokio::time::timeout(deadline, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                Ok(Ok(_)) => closed += 1, // a 408 answer, then the close
                Err(_) => {}
            }
        }
        assert_eq!(closed, MAX_CONNECTIONS + 16, "held connections stayed open");
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.abort();
    }
}
