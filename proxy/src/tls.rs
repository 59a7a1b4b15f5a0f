//! Mutual TLS between enforcers: every enforcer holds a certificate signed by the cluster CA
//! whose DNS name is the enforcer's name. TLS 1.3 only, ring as the crypto provider.
use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use thiserror::Error;

use crate::TUNNEL_ALPN;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The PEM material of one enforcer.
pub struct Credentials {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn file_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in file"));
    }
    Ok(certs)
}

impl Credentials {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca: certs(ca)?,
            chain: certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Server side of the tunnel: only clients with a certificate from the cluster CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider()).build()?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side: verifies the peer enforcer's certificate against the cluster CA and
    /// the peer's configured name, and presents our own certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

/// This enforcer's certificate and key as handshakes use them, replaceable while running:
/// a renewed certificate (same key) is presented from the next handshake on, without
/// touching live tunnels. Both the tunnel server and client resolve through it.
#[derive(Debug)]
pub struct CertSlot {
    now: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    key: Arc<dyn rustls::sign::SigningKey>,
}

impl CertSlot {
    pub fn new(creds: &Credentials) -> Result<Arc<Self>, TlsError> {
        let key = Credentials::provider()
            .key_provider
            .load_private_key(creds.key.clone_key())?;
        let certified = rustls::sign::CertifiedKey::new(creds.chain.clone(), key.clone());
        certified.keys_match()?;
        Ok(Arc::new(Self {
            now: arc_swap::ArcSwap::from_pointee(certified),
            key,
        }))
    }

    /// Presents `chain` from now on; it must be for the same key.
    pub fn replace(&self, chain: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let certified = rustls::sign::CertifiedKey::new(chain, self.key.clone());
        certified.keys_match()?;
        self.now.store(Arc::new(certified));
        Ok(())
    }

    /// The certificate presented now.
    pub fn current(&self) -> CertificateDer<'static> {
        self.now.load().cert[0].clone()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.now.load_full())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.now.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Credentials {
    /// [`Credentials::server_config`], presenting whatever `slot` holds at each handshake.
    pub fn server_config_with(&self, slot: Arc<CertSlot>) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider()).build()?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(slot);
        config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// [`Credentials::client_config`], presenting whatever `slot` holds at each handshake.
    pub fn client_config_with(&self, slot: Arc<CertSlot>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(slot);
        config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The enforcer name in a verified peer certificate: its first DNS subject-alternative name.
pub fn peer_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some((*name).to_owned()),
        _ => None,
    })
}
