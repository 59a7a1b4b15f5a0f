//! The enforcer's local HTTP API:
//!
//! * `GET /api/flows?workload=W&verdict=V&since=MS&limit=N`: recent flow records (JSON).
//! * `GET /api/flows/follow?...`: the same filters, live, as server-sent events (one
//!   `flow` event per record, its data the record's JSON).
//! * `GET /api/map`: this enforcer's connectivity map (nodes and edges, JSON).
//! * `GET /metrics`: Prometheus text format.
//! * `GET /`: the web map (`web/`, bundled into the binary at build time).
//!
//! `GET /api/map?peers=ADDR,ADDR` merges the maps of other enforcers (their APIs) into this
//! one, so the page shows one map of several hosts.
use std::{convert::Infallible, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{
        IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use serde::Deserialize;
use tessera_proxy::flow::FlowRecord;
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};

use crate::{
    flowstore::{FlowFilter, FlowStore},
    map::Map,
};

#[derive(Debug, Default, Deserialize)]
struct FlowsQuery {
    #[serde(flatten)]
    filter: FlowFilter,
    limit: Option<usize>,
}

pub fn router(store: Arc<FlowStore>) -> Router {
    Router::new()
        .route("/api/flows", get(flows))
        .route("/api/flows/follow", get(follow))
        .route("/api/map", get(map))
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/map.js", get(script))
        .with_state(store)
}

async fn flows(
    State(store): State<Arc<FlowStore>>,
    Query(q): Query<FlowsQuery>,
) -> Json<Vec<FlowRecord>> {
    let mut got: Vec<FlowRecord> = store
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
    State(store): State<Arc<FlowStore>>,
    Query(q): Query<FlowsQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let filter = q.filter;
    let stream = BroadcastStream::new(store.subscribe()).filter_map(move |r| match r {
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
    /// Other enforcers' API addresses, comma-separated.
    peers: Option<String>,
}

async fn map(
    State(store): State<Arc<FlowStore>>,
    Query(q): Query<MapQuery>,
) -> Result<Json<Map>, (StatusCode, String)> {
    let mut maps = vec![store.map()];
    let peers: Vec<&str> = q
        .peers
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if !peers.is_empty() {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        for peer in peers {
            let addr: std::net::SocketAddr = peer.parse().map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("peers: {peer:?} is not an address:port"),
                )
            })?;
            let url = format!("http://{addr}/api/map");
            let got = async {
                client
                    .get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .json::<Map>()
                    .await
            }
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("{url}: {e}")))?;
            maps.push(got);
        }
    }
    Ok(Json(crate::map::merge(maps)))
}

const PAGE: &str = include_str!("../web/src/index.html");
/// The bundled web map (build.rs), if this build embeds it (the `embed` feature).
#[cfg(feature = "embed")]
const SCRIPT: Option<&str> = Some(include_str!(concat!(env!("OUT_DIR"), "/map.js")));
#[cfg(not(feature = "embed"))]
const SCRIPT: Option<&str> = None;

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn script() -> axum::response::Response {
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

async fn metrics(State(store): State<Arc<FlowStore>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        store.metrics.render(),
    )
}
