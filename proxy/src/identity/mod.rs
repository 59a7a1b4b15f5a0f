//! Workload identity tokens: what a source enforcer signs for each connection and what the
//! destination enforcer verifies (see `docs/token.md` for the layout).
//!
//! * [`token`]: the canonical binary layout, encoding and decoding.
//! * [`signer`]: an enforcer's Ed25519 key, certified by the cluster CA, signing tokens.
//! * [`verifier`]: checks a token against certified keys, time, destination, TLS session and
//!   replay, and caches verified identities so later tokens can carry just a digest.
//! * [`scope`]: the vouching enforcer's scope stamped on (and checked against) identities.
//! * [`session`]: tokens on a tunnel: the TLS session binding, the peer's certified key,
//!   cold-then-warm signing, and the rule that an enforcer vouches only for its workloads.
pub mod replay;
pub mod scope;
pub mod session;
pub mod signer;
pub mod token;
pub mod verifier;

use tessera_policy::Labels;

/// The labels an enforcer derives itself, in the reserved `tessera.io/` namespace: a
/// workload can never declare them (configuration refuses them), and peers read who a
/// workload is and which enforcer vouches for it from them. Defined once, here.
pub mod reserved {
    pub const PREFIX: &str = "tessera.io/";
    pub const WORKLOAD: &str = "tessera.io/workload";
    pub const ENFORCER: &str = "tessera.io/enforcer";
    pub const HOST: &str = "tessera.io/host";
    pub const CGROUP: &str = "tessera.io/cgroup";
    pub const UID: &str = "tessera.io/uid";
    pub const USER: &str = "tessera.io/user";
    pub const EXE: &str = "tessera.io/exe";
    pub const EXE_SHA256: &str = "tessera.io/exe-sha256";
    pub const CONTAINER_ID: &str = "tessera.io/container-id";
    pub const CONTAINER_RUNTIME: &str = "tessera.io/container-runtime";
    pub const POD_UID: &str = "tessera.io/pod-uid";
    /// What a container runtime or the Kubernetes API says of a workload that a source
    /// (`enforcer/src/sources/`) enrolled: never what the workload itself declares.
    pub const CONTAINER_NAME: &str = "tessera.io/container-name";
    pub const IMAGE: &str = "tessera.io/image";
    /// `sha256:<hex>`: the image's manifest digest as the runtime resolved it.
    pub const IMAGE_DIGEST: &str = "tessera.io/image-digest";
    pub const POD_NAME: &str = "tessera.io/pod";
    pub const NAMESPACE: &str = "tessera.io/namespace";
    pub const SERVICE_ACCOUNT: &str = "tessera.io/service-account";

    /// Whether `key` is one of the reserved names' namespace.
    pub fn is_reserved(key: &str) -> bool {
        key.starts_with(PREFIX)
    }
}

/// A workload's identity as tokens carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// SPIFFE form, for interoperability: `spiffe://<trust-domain>/enforcer/<e>/workload/<w>`.
    pub spiffe: String,
    pub labels: Labels,
}

/// The SPIFFE name of a workload.
pub fn spiffe_id(trust_domain: &str, enforcer: &str, workload: &str) -> String {
    format!("spiffe://{trust_domain}/enforcer/{enforcer}/workload/{workload}")
}

/// A throwaway cluster CA and enforcer certificates for tests (Ed25519, as `tessera ca`
/// makes them).
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod test_ca {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ED25519};

    /// The CA's key and its certificate (DER).
    pub fn ca() -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (key, der)
    }

    /// An enforcer named `name`: its PKCS#8 key and its certificate (DER) from `ca`.
    pub fn enforcer(name: &str, ca_key: &KeyPair, ca_der: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let issuer = Issuer::from_ca_cert_der(&ca_der.to_vec().into(), ca_key).unwrap();
        let cert = CertificateParams::new(vec![name.into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (key.serialize_der(), cert.der().to_vec())
    }
}
