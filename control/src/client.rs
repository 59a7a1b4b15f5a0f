//! A client of the control plane's API, for enforcers and for the `tessera server` admin
//! commands. It trusts only the control plane's CA, presents the enforcer's certificate
//! when it has one, and tries each configured server in turn so that one replica down does
//! not stop an enforcer.
use std::{sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt};
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{self, ErrorBody, WatchMessage},
    plane::{EnrolRequest, Enrolment},
    policy::PolicyVersion,
    registry::Serves,
    scope::Scope,
};

/// Longest line a watch stream may send (a snapshot of a large directory is one line).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane TLS: {0}")]
    Tls(String),
    #[error("control plane {server}: {error}")]
    Unreachable { server: String, error: String },
    #[error("control plane {server} refused: {message} ({status})")]
    Refused {
        server: String,
        status: u16,
        message: String,
        retryable: bool,
    },
    #[error("control plane {server}: unexpected answer: {error}")]
    Protocol { server: String, error: String },
    #[error("no control plane server configured")]
    NoServer,
}

impl ClientError {
    /// Whether trying again later (or another server) may help.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Protocol { .. } => true,
            ClientError::Refused { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    servers: Vec<String>,
    http: reqwest::Client,
}

/// An enforcer's credentials for mutual TLS: certificate chain (PEM) and PKCS#8 key (DER).
pub struct Identity<'a> {
    pub cert_pem: &'a str,
    pub key_pkcs8: &'a [u8],
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|e| ClientError::Tls(e.to_string()))?;
        out.push(CertificateDer::from(p.contents));
    }
    if out.is_empty() {
        return Err(ClientError::Tls("no certificate in PEM".into()));
    }
    Ok(out)
}

impl Client {
    /// A client for `servers` (`https://host:port`), trusting the CA in `ca_pem`.
    pub fn new(
        servers: &[String],
        ca_pem: &str,
        identity: Option<Identity<'_>>,
    ) -> Result<Self, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::NoServer);
        }
        let tls = |e: rustls::Error| ClientError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(ca_pem)? {
            roots.add(c).map_err(tls)?;
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls)?
                .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    pem_certs(id.cert_pem)?,
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8.to_vec())),
                )
                .map_err(tls)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self {
            servers: servers
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            http,
        })
    }

    async fn answer<T: DeserializeOwned>(
        server: &str,
        r: reqwest::Response,
    ) -> Result<T, ClientError> {
        let status = r.status();
        if status.is_success() {
            if status == reqwest::StatusCode::NO_CONTENT {
                return serde_json::from_str("null").map_err(|e| ClientError::Protocol {
                    server: server.into(),
                    error: e.to_string(),
                });
            }
            return r.json().await.map_err(|e| ClientError::Protocol {
                server: server.into(),
                error: e.to_string(),
            });
        }
        let body: Option<ErrorBody> = r.json().await.ok();
        Err(ClientError::Refused {
            server: server.into(),
            status: status.as_u16(),
            message: body
                .as_ref()
                .map(|b| b.error.clone())
                .unwrap_or_else(|| status.to_string()),
            retryable: body.is_some_and(|b| b.retryable),
        })
    }

    /// Sends to each server in turn until one answers (an answer, even a refusal, ends it).
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        let mut last = ClientError::NoServer;
        for s in &self.servers {
            let mut req = self
                .http
                .request(method.clone(), format!("{s}{path}"))
                .timeout(Duration::from_secs(15));
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(t) = bearer {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) => return Self::answer(s, r).await,
                Err(e) => {
                    last = ClientError::Unreachable {
                        server: s.clone(),
                        error: error_chain(&e),
                    }
                }
            }
        }
        Err(last)
    }

    pub async fn enrol(&self, req: &EnrolRequest) -> Result<Enrolment, ClientError> {
        self.call(reqwest::Method::POST, api::ENROL, Some(req), None)
            .await
    }

    pub async fn renew(&self, csr: &str) -> Result<Enrolment, ClientError> {
        let body = api::RenewRequest { csr: csr.into() };
        self.call(reqwest::Method::POST, api::RENEW, Some(&body), None)
            .await
    }

    pub async fn report(&self, serves: &Serves, policy_version: u64) -> Result<(), ClientError> {
        let body = api::ReportRequest {
            serves: serves.clone(),
            policy_version,
        };
        self.call(reqwest::Method::POST, api::REPORT, Some(&body), None)
            .await
    }

    /// Sends this enforcer's own map (the server keeps its latest).
    pub async fn report_map(&self, map: &tessera_proxy::map::Map) -> Result<(), ClientError> {
        self.call(reqwest::Method::POST, api::MAP, Some(map), None)
            .await
    }

    /// The watch stream of the first server that accepts it: messages until it ends.
    pub async fn watch(
        &self,
    ) -> Result<
        (
            String,
            impl Stream<Item = Result<WatchMessage, ClientError>> + use<>,
        ),
        ClientError,
    > {
        let mut last = ClientError::NoServer;
        for s in &self.servers {
            let r = match self.http.get(format!("{s}{}", api::WATCH)).send().await {
                Ok(r) => r,
                Err(e) => {
                    last = ClientError::Unreachable {
                        server: s.clone(),
                        error: error_chain(&e),
                    };
                    continue;
                }
            };
            if !r.status().is_success() {
                return Err(Self::answer::<()>(s, r).await.unwrap_err());
            }
            let server = s.clone();
            let bytes = r.bytes_stream();
            let lines = futures_util::stream::unfold(
                (bytes, Vec::<u8>::new(), server.clone()),
                |(mut bytes, mut buf, server)| async move {
                    loop {
                        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=i).collect();
                            let m = serde_json::from_slice::<WatchMessage>(&line).map_err(|e| {
                                ClientError::Protocol {
                                    server: server.clone(),
                                    error: e.to_string(),
                                }
                            });
                            return Some((m, (bytes, buf, server)));
                        }
                        if buf.len() > MAX_LINE {
                            let e = ClientError::Protocol {
                                server: server.clone(),
                                error: "watch line too long".into(),
                            };
                            return Some((Err(e), (bytes, Vec::new(), server)));
                        }
                        match bytes.next().await {
                            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                            Some(Err(e)) => {
                                let e = ClientError::Unreachable {
                                    server: server.clone(),
                                    error: error_chain(&e),
                                };
                                return Some((Err(e), (bytes, Vec::new(), server)));
                            }
                            None => return None,
                        }
                    }
                },
            );
            return Ok((server, lines));
        }
        Err(last)
    }

    pub async fn create_token(
        &self,
        admin: &str,
        scope: &Scope,
        ttl: Duration,
    ) -> Result<api::TokenResponse, ClientError> {
        let body = api::TokenRequest {
            scope: scope.clone(),
            ttl_s: ttl.as_secs(),
        };
        self.call(
            reqwest::Method::POST,
            api::ADMIN_TOKENS,
            Some(&body),
            Some(admin),
        )
        .await
    }

    pub async fn apply_policy(
        &self,
        admin: &str,
        file: &str,
        text: &str,
    ) -> Result<PolicyVersion, ClientError> {
        let body = api::PolicyRequest {
            file: file.into(),
            text: text.into(),
        };
        self.call(
            reqwest::Method::POST,
            api::ADMIN_POLICY,
            Some(&body),
            Some(admin),
        )
        .await
    }

    /// The policy in force, if any was applied.
    pub async fn current_policy(
        &self,
        admin: &str,
    ) -> Result<Option<crate::policy::PolicyVersion>, ClientError> {
        match self
            .call::<(), _>(reqwest::Method::GET, api::ADMIN_POLICY, None, Some(admin))
            .await
        {
            Ok(p) => Ok(Some(p)),
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The fleet's map: every enforcer's latest, merged.
    pub async fn fleet_map(&self, admin: &str) -> Result<tessera_proxy::map::Map, ClientError> {
        self.call::<(), _>(reqwest::Method::GET, api::ADMIN_MAP, None, Some(admin))
            .await
    }

    pub async fn status(&self, admin: &str) -> Result<api::Status, ClientError> {
        self.call::<(), _>(reqwest::Method::GET, api::ADMIN_STATUS, None, Some(admin))
            .await
    }

    pub async fn revoke(&self, admin: &str, name: &str) -> Result<(), ClientError> {
        let path = format!("{}/{name}/revoke", api::ADMIN_ENFORCERS);
        self.call::<(), ()>(reqwest::Method::POST, &path, None, Some(admin))
            .await
    }

    pub async fn remove(&self, admin: &str, name: &str) -> Result<(), ClientError> {
        let path = format!("{}/{name}", api::ADMIN_ENFORCERS);
        self.call::<(), ()>(reqwest::Method::DELETE, &path, None, Some(admin))
            .await
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
