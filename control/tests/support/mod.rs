//! Helpers shared by the control plane's integration tests.
#![allow(dead_code)]
pub mod contract;
pub mod etcd;

use std::time::Duration;

use futures_util::StreamExt;
use rcgen::{CertificateParams, KeyPair};
use tessera_control::{api::WatchMessage, client::ClientError};

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
