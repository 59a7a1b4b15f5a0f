//! The CLI side of the API: `tessera flows` and `tessera map` read enforcers' APIs (or flow
//! log files) and print tables, JSON or Graphviz.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tessera_proxy::flow::FlowRecord;

use crate::{
    flowlog,
    flowstore::FlowFilter,
    map::{self, Map, Role, node_name, verdict_name},
};

pub struct Sources {
    apis: Vec<SocketAddr>,
    logs: Vec<PathBuf>,
    /// The bearer token sent to the APIs (`--token-file`).
    token: Option<String>,
}

impl Sources {
    /// Without either, the local enforcer's default API.
    pub fn new(mut apis: Vec<SocketAddr>, logs: Vec<PathBuf>) -> Self {
        if apis.is_empty() && logs.is_empty() {
            apis.push(SocketAddr::from(([127, 0, 0, 1], 15090)));
        }
        Self {
            apis,
            logs,
            token: None,
        }
    }

    /// Sends the token in `file` (an API's `[flows] api_token_file`, or a copy: mode 0600,
    /// owned by the user running the command) to every API.
    pub fn with_token_file(mut self, file: Option<&Path>) -> Result<Self> {
        if let Some(file) = file {
            self.token = Some(
                crate::api::read_token_file(file)
                    .map_err(|e| anyhow::anyhow!("--token-file: {e}"))?,
            );
        }
        Ok(self)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

/// A GET with the bearer token, if any.
fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let req = client.get(url);
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// Fails with the status and what the API said (why it refused, say).
async fn ensure_success(url: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
        " (give the API's token with --token-file)"
    } else {
        ""
    };
    bail!("{url}: {status}{hint}: {}", body.trim())
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
    token: Option<&str>,
) -> Result<T> {
    let resp = get(client, &url, token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let resp = ensure_success(&url, resp).await?;
    resp.json()
        .await
        .with_context(|| format!("{url}: not the expected JSON"))
}

fn query(filter: &FlowFilter) -> String {
    let mut q = Vec::new();
    if let Some(w) = &filter.workload {
        q.push(format!("workload={w}"));
    }
    if let Some(v) = &filter.verdict {
        q.push(format!("verdict={v}"));
    }
    if let Some(s) = filter.since {
        q.push(format!("since={s}"));
    }
    q.join("&")
}

pub fn map(sources: Sources) -> Result<Map> {
    let mut maps = Vec::new();
    if !sources.logs.is_empty() {
        maps.push(map::from_records(&flowlog::read(&sources.logs)?));
    }
    if !sources.apis.is_empty() {
        let rt = runtime()?;
        let client = http()?;
        for api in &sources.apis {
            let url = format!("http://{api}/api/map");
            maps.push(rt.block_on(get_json(&client, url, sources.token.as_deref()))?);
        }
    }
    Ok(map::merge(maps))
}

pub fn flows(sources: Sources, filter: FlowFilter, follow: bool, json: bool) -> Result<()> {
    let mut records: Vec<FlowRecord> = flowlog::read(&sources.logs)?
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    let rt = runtime()?;
    let client = http()?;
    for api in &sources.apis {
        let url = format!("http://{api}/api/flows?{}", query(&filter));
        let token = sources.token.as_deref();
        records.extend(rt.block_on(get_json::<Vec<FlowRecord>>(&client, url, token))?);
    }
    records.sort_by_key(|r| r.start_ms);
    print_records(&records, json, true);
    if !follow {
        return Ok(());
    }
    let [api] = sources.apis.as_slice() else {
        bail!("--follow needs exactly one --api");
    };
    rt.block_on(async {
        let url = format!("http://{api}/api/flows/follow?{}", query(&filter));
        let resp = get(&client, &url, sources.token.as_deref())
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let mut resp = ensure_success(&url, resp).await?;
        // Server-sent events: `event: flow` / `data: <json>` blocks.
        let mut buf = String::new();
        while let Some(chunk) = resp.chunk().await? {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                for line in block.lines() {
                    if let Some(data) = line.strip_prefix("data:")
                        && let Ok(r) = serde_json::from_str::<FlowRecord>(data.trim())
                    {
                        print_records(&[r], json, false);
                    }
                }
            }
        }
        Ok(())
    })
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in ms.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn print_records(records: &[FlowRecord], json: bool, header: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        for r in records {
            let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        }
        return;
    }
    if header {
        let _ = writeln!(
            out,
            "{:<12}  {:<8}  {:<8}  {:<9}  {:<28}  {:<28}  {:>5}  {:<19}  {:<16}  {:<18}  {:>9}  {:>9}",
            "TIME",
            "REPORTER",
            "DIR",
            "MODE",
            "SOURCE",
            "DESTINATION",
            "PORT",
            "VERDICT",
            "CODE",
            "RULE",
            "BYTES OUT",
            "BYTES BACK"
        );
    }
    for r in records {
        let dir = format!("{:?}", r.direction).to_lowercase();
        let mode = format!("{:?}", r.mode).to_lowercase();
        let _ = writeln!(
            out,
            "{:<12}  {:<8}  {:<8}  {:<9}  {:<28}  {:<28}  {:>5}  {:<19}  {:<16}  {:<18}  {:>9}  {:>9}",
            clock(r.start_ms),
            r.reporter,
            dir,
            mode,
            node_name(&r.src, Role::Source),
            node_name(&r.dst, Role::Destination),
            r.dst.addr.port(),
            verdict_name(r.verdict),
            r.code,
            r.rule.as_deref().unwrap_or("-"),
            r.bytes_sent,
            r.bytes_received
        );
    }
    let _ = out.flush();
}
