//! The enforcer's local HTTP API:
//!
//! * `GET /api/flows?workload=W&verdict=V&since=MS&limit=N`: recent flow records (JSON).
//! * `GET /api/flows/follow?...`: the same filters, live, as server-sent events (one
//!   `flow` event per record, its data the record's JSON).
//! * `GET /api/map`: this enforcer's connectivity map (nodes and edges, JSON);
//!   `?new_after=1h` marks the edges first seen after that baseline window as new.
//! * `GET /api/source`: what the page shows (`{"kind":"enforcer"}`; the fleet viewer,
//!   [`crate::fleetview`], serves the same page with `"fleet"`).
//! * `GET /metrics`: Prometheus text format.
//! * `GET /`: the web map (`web/`, bundled into the binary at build time).
//!
//! `GET /api/map?peers=P,P` merges the maps of other enforcers into this one, so the page
//! shows one map of several hosts. `P` is a configured peer's API (`[[peer]] api`, as
//! `address:port`) or its name; anything else is refused (400), so the API cannot be made
//! to fetch arbitrary addresses. Each fetch has [`PEER_FETCH_TIME`] and [`PEER_MAP_BYTES`]
//! as limits, the size counted while the body arrives, and follows no redirect.
//!
//! Who may ask ([`Guard`]): on a loopback address only requests whose `Host` is an IP
//! address or `localhost` (a web page that rebinds its own DNS name to 127.0.0.1 sends its
//! name: 403); with a token file (required off loopback) only requests carrying
//! `Authorization: Bearer <token>` (401), compared in constant time.
use std::{
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tessera_proxy::flow::FlowRecord;
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};

use crate::{
    config::Config,
    flowstore::{FlowFilter, FlowStore},
    map::Map,
};

/// How long fetching one peer's map may take, connecting and reading included.
pub const PEER_FETCH_TIME: Duration = Duration::from_secs(3);
/// The largest peer map accepted; a body past it is cut off as it arrives.
pub const PEER_MAP_BYTES: usize = 8 << 20;
/// The shortest bearer token accepted.
const MIN_TOKEN_LEN: usize = 16;

/// Whether an API on `addr` is reachable from this host only.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Reads a bearer token file: it must be a regular file owned by this process's user, with
/// no permission for group or others, holding one token of at least 16 visible ASCII
/// characters (surrounding whitespace is ignored). Errors name the file.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let at = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{at} is not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{at} is owned by uid {}, not by the enforcer's user (uid {me})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{at} is mode {mode:04o}: it must be 0600 or stricter (no access for group or others)"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{at} must hold one token of at least {MIN_TOKEN_LEN} visible ASCII characters \
             (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(token.to_owned())
}

/// Whether a `Host` header names an IP address (v4, or v6 in brackets, with or without a
/// port) or `localhost`: what a client that reached a loopback API on purpose sends. A DNS
/// rebinding page sends its own name.
pub fn host_allowed(host: &str) -> bool {
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port_fine = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return port_fine && ip.parse::<Ipv6Addr>().is_ok();
    }
    let name = match host.rsplit_once(':') {
        // A bare IPv6 address (no brackets) has more than one colon.
        Some((name, port)) if !name.contains(':') => {
            if !port_ok(port) {
                return false;
            }
            name
        }
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<Ipv4Addr>().is_ok()
        || name.parse::<Ipv6Addr>().is_ok()
}

/// Whether `authorization` is `Bearer <token>` for the token whose SHA-256 is `want`. The
/// comparison is of digests, in constant time: neither the token's bytes nor its length
/// show in the time taken.
pub fn bearer_matches(authorization: Option<&HeaderValue>, want: &[u8; 32]) -> bool {
    let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let got: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    got.ct_eq(want).into()
}

/// Who may use the API: the Host check on loopback, the bearer token when one is set.
#[derive(Clone)]
pub struct Guard {
    /// Check the Host header (the API listens on loopback).
    pub check_host: bool,
    /// SHA-256 of the bearer token, if requests must carry one.
    pub token_sha256: Option<[u8; 32]>,
}

impl Guard {
    pub fn new(listen: SocketAddr, token: Option<&str>) -> Self {
        Self {
            check_host: is_loopback(listen),
            token_sha256: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// Ok, or the refusal to send (status, body).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        if self.check_host {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            if !host.is_some_and(host_allowed) {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "Host {:?} refused: this API listens on loopback and serves only \
                         requests addressed to an IP address or localhost (DNS rebinding \
                         protection)\n",
                        host.unwrap_or("")
                    ),
                ));
            }
        }
        if let Some(want) = &self.token_sha256
            && !bearer_matches(headers.get(header::AUTHORIZATION), want)
        {
            return Err((
                StatusCode::UNAUTHORIZED,
                "this API needs `Authorization: Bearer <token>` with the token of \
                 flows.api_token_file (tessera flows/map: --token-file)\n"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The [`Guard`] as middleware.
pub async fn guard(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match guard.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err((status, body)) => {
            let mut resp = (status, body).into_response();
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            resp
        }
    }
}

/// A configured peer's API: the only places `?peers=` fetches from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerApi {
    pub name: String,
    pub addr: SocketAddr,
    /// Its bearer token, sent to it alone.
    pub token: Option<String>,
}

/// What the API serves and to whom, read from the configuration.
pub struct Settings {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub peers: Vec<PeerApi>,
}

impl Settings {
    /// The API's settings (None: `[flows] api = ""`), token files read.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let Some(listen) = config.flows.api_addr() else {
            return Ok(None);
        };
        let token = match &config.flows.api_token_file {
            Some(f) => {
                Some(read_token_file(f).map_err(|e| anyhow::anyhow!("flows.api_token_file: {e}"))?)
            }
            None => None,
        };
        let mut peers = Vec::new();
        for (i, p) in config.peers.iter().enumerate() {
            let Some(addr) = p.api else { continue };
            let token =
                match &p.api_token_file {
                    Some(f) => Some(read_token_file(f).map_err(|e| {
                        anyhow::anyhow!("peer[{i}] {:?}: api_token_file: {e}", p.name)
                    })?),
                    None => None,
                };
            peers.push(PeerApi {
                name: p.name.clone(),
                addr,
                token,
            });
        }
        Ok(Some(Self {
            listen,
            token,
            peers,
        }))
    }
}

/// `?peers=` resolved against the configured peers: each entry a peer's API address or its
/// name, duplicates once; anything else is the error, naming it.
pub fn resolve_peers<'a>(query: &str, peers: &'a [PeerApi]) -> Result<Vec<&'a PeerApi>, String> {
    let mut out: Vec<&PeerApi> = Vec::new();
    for entry in query.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let found = match entry.parse::<SocketAddr>() {
            Ok(addr) => peers.iter().find(|p| p.addr == addr),
            Err(_) => peers.iter().find(|p| p.name == entry),
        };
        let Some(peer) = found else {
            return Err(format!(
                "peers: {entry:?} is not the API of a configured peer: only [[peer]] api \
                 addresses (or peer names) are fetched; configured: [{}]",
                peers
                    .iter()
                    .map(|p| format!("{} ({})", p.addr, p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if !out.iter().any(|p| p.addr == peer.addr) {
            out.push(peer);
        }
    }
    Ok(out)
}

/// Limits of one peer fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    pub time: Duration,
    pub bytes: usize,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            time: PEER_FETCH_TIME,
            bytes: PEER_MAP_BYTES,
        }
    }
}

/// The client peers' maps are fetched with: no redirects (an allowed peer cannot send us
/// elsewhere), no proxy from the environment, the time limit on the whole exchange.
pub fn peer_client(limits: FetchLimits) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(limits.time)
        .timeout(limits.time)
        .build()
}

fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// Why a peer fetch failed.
enum FetchError {
    /// The time limit ran out (ours, or the client's own with the same limit).
    Time,
    Other(String),
}

impl From<reqwest::Error> for FetchError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            return Self::Time;
        }
        // reqwest's own message is only the outermost ("error sending request"): add causes.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Self::Other(text)
    }
}

/// Fetches one peer's map within `limits`: the body is counted as it arrives and the
/// exchange dropped once it passes the size limit or the time runs out.
pub async fn fetch_peer_map(
    client: &reqwest::Client,
    peer: &PeerApi,
    limits: FetchLimits,
) -> Result<Map, String> {
    let url = format!("http://{}/api/map", peer.addr);
    let too_big = || {
        FetchError::Other(format!(
            "its answer is larger than {}: cut off",
            human_bytes(limits.bytes)
        ))
    };
    let fetch = async {
        let mut req = client.get(&url);
        if let Some(t) = &peer.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(FetchError::Other(format!("answered {}", resp.status())));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > limits.bytes as u64)
        {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > limits.bytes {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice::<Map>(&body)
            .map_err(|e| FetchError::Other(format!("not a map: {e}")))
    };
    let why = match tokio::time::timeout(limits.time, fetch).await {
        Ok(Ok(map)) => return Ok(map),
        Ok(Err(FetchError::Other(e))) => e,
        Ok(Err(FetchError::Time)) | Err(_) => format!(
            "no complete answer within {} s: cut off",
            limits.time.as_secs_f32()
        ),
    };
    Err(format!("peer {:?} ({url}): {why}", peer.name))
}

/// What the handlers share.
struct Api {
    store: Arc<FlowStore>,
    peers: Vec<PeerApi>,
    client: reqwest::Client,
    limits: FetchLimits,
}

#[derive(Debug, Default, Deserialize)]
struct FlowsQuery {
    #[serde(flatten)]
    filter: FlowFilter,
    limit: Option<usize>,
}

/// The API's routes behind its [`Guard`].
pub fn router(store: Arc<FlowStore>, settings: Settings) -> anyhow::Result<Router> {
    router_with(store, settings, FetchLimits::default())
}

fn router_with(
    store: Arc<FlowStore>,
    settings: Settings,
    limits: FetchLimits,
) -> anyhow::Result<Router> {
    let guard = Arc::new(Guard::new(settings.listen, settings.token.as_deref()));
    let api = Arc::new(Api {
        store,
        peers: settings.peers,
        client: peer_client(limits).context("cannot make the client for peers' maps")?,
        limits,
    });
    Ok(Router::new()
        .route("/api/flows", get(flows))
        .route("/api/flows/follow", get(follow))
        .route("/api/map", get(map))
        .route("/api/source", get(source))
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/map.js", get(script))
        .with_state(api)
        .layer(middleware::from_fn_with_state(guard, self::guard)))
}

async fn flows(State(api): State<Arc<Api>>, Query(q): Query<FlowsQuery>) -> Json<Vec<FlowRecord>> {
    let mut got: Vec<FlowRecord> = api
        .store
        .recent(|r| q.filter.matches(r))
        .iter()
        .map(|r| (**r).clone())
        .collect();
    if let Some(limit) = q.limit {
        let skip = got.len().saturating_sub(limit);
        got.drain(..skip);
    }
    Json(got)
}

async fn follow(
    State(api): State<Arc<Api>>,
    Query(q): Query<FlowsQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let filter = q.filter;
    let stream = BroadcastStream::new(api.store.subscribe()).filter_map(move |r| match r {
        Ok(rec) if filter.matches(&rec) => {
            Event::default().event("flow").json_data(&*rec).ok().map(Ok)
        }
        Ok(_) => None,
        // A slow follower missed records: say so rather than pretend.
        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
            Some(Ok(Event::default().event("lagged").data(n.to_string())))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Debug, Default, Deserialize)]
struct MapQuery {
    /// Configured peers' API addresses (or names), comma-separated.
    peers: Option<String>,
    #[serde(flatten)]
    new: NewAfter,
}

/// `?new_after=DURATION` (`1h`, `90s`): the baseline window of [`crate::map::mark_new`].
#[derive(Debug, Default, Deserialize)]
pub struct NewAfter {
    pub new_after: Option<String>,
}

impl NewAfter {
    /// The window in milliseconds, if one was asked for; a bad one is the 400 to send.
    pub fn window_ms(&self) -> Result<Option<u64>, (StatusCode, String)> {
        let Some(text) = self.new_after.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        humantime::parse_duration(text)
            .map(|d| Some(d.as_millis().min(u64::MAX as u128) as u64))
            .map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("new_after: {text:?} is not a duration (e.g. 1h, 90s): {e}\n"),
                )
            })
    }
}

async fn source() -> impl IntoResponse {
    Json(serde_json::json!({ "kind": "enforcer" }))
}

async fn map(
    State(api): State<Arc<Api>>,
    Query(q): Query<MapQuery>,
) -> Result<Json<Map>, (StatusCode, String)> {
    let peers = resolve_peers(q.peers.as_deref().unwrap_or(""), &api.peers)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let new_after = q.new.window_ms()?;
    let fetched = futures_util::future::join_all(
        peers
            .iter()
            .map(|p| fetch_peer_map(&api.client, p, api.limits)),
    )
    .await;
    let mut maps = vec![api.store.map()];
    let mut errors = Vec::new();
    for got in fetched {
        match got {
            Ok(m) => maps.push(m),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err((StatusCode::BAD_GATEWAY, format!("{}\n", errors.join("\n"))));
    }
    let mut merged = crate::map::merge(maps);
    if let Some(window) = new_after {
        crate::map::mark_new(&mut merged, window);
    }
    Ok(Json(merged))
}

const PAGE: &str = include_str!("../web/src/index.html");
/// The bundled web map (build.rs), if this build embeds it (the `embed` feature).
#[cfg(feature = "embed")]
const SCRIPT: Option<&str> = Some(include_str!(concat!(env!("OUT_DIR"), "/map.js")));
#[cfg(not(feature = "embed"))]
const SCRIPT: Option<&str> = None;

/// The web map's page (also served by [`crate::fleetview`]).
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Only its own script; never framed (no clickjacking of the filters).
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

/// The web map's bundled script (also served by [`crate::fleetview`]).
pub async fn script() -> axum::response::Response {
    match SCRIPT {
        Some(script) => (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            script,
        )
            .into_response(),
        None => (
            StatusCode::NOT_IMPLEMENTED,
            "this build has no web map: built without the `embed` feature\n",
        )
            .into_response(),
    }
}

async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        api.store.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[test]
    fn only_ip_literals_and_localhost_pass_the_host_check() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:15090",
            "10.77.0.2:15090",
            "[::1]",
            "[::1]:15090",
            "[fd77::2]:80",
            "::1",
            "localhost",
            "localhost:15090",
            "LocalHost:1",
        ] {
            assert!(host_allowed(ok), "{ok} must pass");
        }
        for bad in [
            "attacker.example",
            "attacker.example:15090",
            "localhost.attacker.example",
            "localhost.",
            "127.0.0.1.nip.io",
            "2130706433",
            "0x7f.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:80x",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[evil]:80",
            "",
        ] {
            assert!(!host_allowed(bad), "{bad} must be refused");
        }
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        let want: [u8; 32] = Sha256::digest(b"0123456789abcdef-token").into();
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(bearer_matches(
            Some(&v("Bearer 0123456789abcdef-token")),
            &want
        ));
        assert!(bearer_matches(
            Some(&v("bearer 0123456789abcdef-token")),
            &want
        ));
        for bad in [
            "Bearer 0123456789abcdef-toke",
            "Bearer 0123456789abcdef-tokenX",
            "Bearer ",
            "Basic 0123456789abcdef-token",
            "0123456789abcdef-token",
            "",
        ] {
            assert!(!bearer_matches(Some(&v(bad)), &want), "{bad:?}");
        }
        assert!(!bearer_matches(None, &want));
    }

    #[test]
    fn the_guard_checks_the_host_on_loopback_and_the_token_when_set() {
        let loopback = Guard::new("127.0.0.1:15090".parse().unwrap(), None);
        assert!(
            loopback
                .check(&headers(&[(header::HOST, "127.0.0.1:15090")]))
                .is_ok()
        );
        let (status, body) = loopback
            .check(&headers(&[(header::HOST, "attacker.example")]))
            .unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("\"attacker.example\" refused"), "{body}");
        assert_eq!(
            loopback.check(&HeaderMap::new()).unwrap_err().0,
            StatusCode::FORBIDDEN,
            "no Host at all"
        );
        // Off loopback: any Host (names are how remote clients reach it), but the token.
        let remote = Guard::new(
            "10.0.0.1:15090".parse().unwrap(),
            Some("s3cret-s3cret-s3cret"),
        );
        assert!(!remote.check_host);
        let host = (header::HOST, "enforcer.example:15090");
        assert_eq!(
            remote
                .check(&headers(std::slice::from_ref(&host)))
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            remote
                .check(&headers(&[
                    host,
                    (header::AUTHORIZATION, "Bearer s3cret-s3cret-s3cret")
                ]))
                .is_ok()
        );
        // A token on loopback: both checks.
        let both = Guard::new("[::1]:15090".parse().unwrap(), Some("s3cret-s3cret-s3cret"));
        let auth = (header::AUTHORIZATION, "Bearer s3cret-s3cret-s3cret");
        assert!(
            both.check(&headers(&[(header::HOST, "[::1]:15090"), auth.clone()]))
                .is_ok()
        );
        assert_eq!(
            both.check(&headers(&[(header::HOST, "evil.example"), auth]))
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert!(is_loopback("[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0:1".parse().unwrap()));
    }

    fn peer(name: &str, addr: &str) -> PeerApi {
        PeerApi {
            name: name.into(),
            addr: addr.parse().unwrap(),
            token: None,
        }
    }

    #[test]
    fn peers_are_only_configured_peer_apis() {
        let peers = [
            peer("host-a", "10.77.0.1:15090"),
            peer("host-c", "[fd77::3]:15090"),
        ];
        let names = |q| {
            resolve_peers(q, &peers)
                .unwrap()
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(""), Vec::<&str>::new());
        assert_eq!(
            names("10.77.0.1:15090, host-c,host-a"),
            ["host-a", "host-c"]
        );
        assert_eq!(names("[fd77::3]:15090"), ["host-c"]);
        for bad in [
            "169.254.169.254:80",
            "10.77.0.1:22",
            "127.0.0.1:15090",
            "host-b",
            "http://10.77.0.1:15090",
        ] {
            let e = resolve_peers(&format!("10.77.0.1:15090,{bad}"), &peers).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "peers: {bad:?} is not the API of a configured peer"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn token_files_must_be_private_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("api.token");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&f).unwrap(), "0123456789abcdef0123");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_token_file(&f).unwrap_err();
        assert!(
            e.contains(&f.display().to_string()) && e.contains("mode 0640"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(
            read_token_file(&f).is_ok(),
            "read-only for its owner is fine"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "short\n").unwrap();
        assert!(read_token_file(&f).unwrap_err().contains("at least 16"));
        std::fs::write(&f, "0123456789 abcdef0123\n").unwrap();
        assert!(read_token_file(&f).unwrap_err().contains("visible ASCII"));
        assert!(
            read_token_file(&dir.path().join("nope"))
                .unwrap_err()
                .contains("cannot read")
        );
    }

    /// A fake peer API on loopback that answers each request with `answer` (after reading
    /// its head) and reports how many bytes it wrote before the client went away.
    async fn fake_peer(answer: &'static str) -> (PeerApi, tokio::sync::oneshot::Receiver<usize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = vec![0; 4096];
            let _ = s.read(&mut head).await;
            let mut sent = 0;
            match answer {
                "silent" => {
                    let _ = s.read(&mut head).await;
                }
                "endless" => {
                    let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n";
                    s.write_all(start.as_bytes()).await.unwrap();
                    let block = vec![b' '; 16 << 10];
                    while s.write_all(&block).await.is_ok() {
                        sent += block.len();
                    }
                }
                "redirect" => {
                    let r = "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n";
                    s.write_all(r.as_bytes()).await.unwrap();
                    let _ = s.read(&mut head).await;
                }
                _ => unreachable!(),
            }
            let _ = tx.send(sent);
        });
        (peer("fake", &addr.to_string()), rx)
    }

    #[tokio::test]
    async fn a_peer_fetch_is_cut_off_at_its_size_and_time_limits() {
        let limits = FetchLimits {
            time: Duration::from_millis(500),
            bytes: 1 << 20,
        };
        let client = peer_client(limits).unwrap();
        // An endless body: cut at the size limit, long before the time limit.
        let (p, sent) = fake_peer("endless").await;
        let t = std::time::Instant::now();
        let e = fetch_peer_map(&client, &p, limits).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
        assert!(e.contains("larger than 1 MiB: cut off"), "{e}");
        let sent = sent.await.unwrap();
        assert!(sent < 16 << 20, "the peer wrote {sent} bytes: not cut off");
        // No answer: cut at the time limit.
        let (p, _) = fake_peer("silent").await;
        let t = std::time::Instant::now();
        let e = fetch_peer_map(&client, &p, limits).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        assert!(e.contains("no complete answer within 0.5 s"), "{e}");
        // A redirect is not followed.
        let (p, _) = fake_peer("redirect").await;
        let e = fetch_peer_map(&client, &p, limits).await.unwrap_err();
        assert!(e.contains("answered 302"), "{e}");
    }
}
