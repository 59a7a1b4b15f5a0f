//! Helpers shared by the control plane's integration tests.
#![allow(dead_code)]
pub mod contract;
pub mod etcd;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use rcgen::{CertificateParams, KeyPair};
use tessera_control::{
    api::WatchMessage,
    client::{Client, ClientError},
    plane::ControlPlane,
    server,
};

/// A control plane serving its API over TLS on a loopback port of its own; the server task
/// stops when this drops.
pub struct Served {
    pub url: String,
    /// The plane's CA, which a client trusts.
    pub ca: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    /// Serves `plane` with a certificate for `names` (addresses or host names).
    pub async fn start(plane: Arc<ControlPlane>, names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let tls = server::tls_config(&plane, &names).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let ca = plane.authority().ca_pem().to_string();
        let task = tokio::spawn(async move {
            server::serve(listener, tls, plane, std::future::pending())
                .await
                .unwrap()
        });
        Served { url, ca, task }
    }

    /// A client without a certificate of its own.
    pub fn anonymous(&self) -> Client {
        Client::new(std::slice::from_ref(&self.url), &self.ca, None).unwrap()
    }
}

/// A certificate request for `key` (the server fills in name and scope).
pub fn csr(key: &KeyPair) -> String {
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// The next watch message other than a ping, within `within`.
pub async fn next_within(
    w: &mut (impl futures_util::Stream<Item = Result<WatchMessage, ClientError>> + Unpin),
    within: Duration,
) -> WatchMessage {
    loop {
        let m = tokio::time::timeout(within, w.next())
            .await
            .unwrap_or_else(|_| panic!("a watch message within {within:?}"))
            .expect("stream open")
            .unwrap();
        if !matches!(m, WatchMessage::Ping { .. }) {
            return m;
        }
    }
}
