//! The enforcer's local HTTP API:
//!
//! * `GET /api/flows?workload=W&verdict=V&since=MS&limit=N`: recent flow records (JSON).
//! * `GET /api/flows/follow?...`: the same filters, live, as server-sent events (one
//!   `flow` event per record, its data the record's JSON).
//! * `GET /api/map`: this enforcer's connectivity map (nodes and edges, JSON).
//! * `GET /metrics`: Prometheus text format.
use std::{convert::Infallible, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::header,
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

async fn map(State(store): State<Arc<FlowStore>>) -> Json<Map> {
    Json(store.map())
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
