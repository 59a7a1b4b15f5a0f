//! The identity authority: the control plane's CA, which alone holds the signing key and
//! issues each enforcer a short-lived certificate carrying its name and scope.
//!
//! An enforcer generates its own Ed25519 key and sends a certificate signing request; the
//! request only proves possession of that key. Everything the certificate says — the DNS
//! name and SPIFFE name (`spiffe://<trust domain>/enforcer/<name>`), the scope (as the
//! subject's organisational unit, canonical `k=v,k=v`), the lifetime — comes from the
//! enrolment record, never from the request. Enforcer keys are Ed25519 because the same key
//! signs identity tokens.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::{
    scope::Scope,
    store::{Store, StoreError},
};

/// The store key of the CA (key and certificate, PEM).
const CA_KEY: &str = "authority/ca";
/// Certificates start this long before they are issued, for clocks that lag.
const BACKDATE: Duration = Duration::from_secs(60);
/// Shortest and longest lifetimes the authority issues.
pub const MIN_LIFETIME: Duration = Duration::from_secs(10);
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enforcer name {0:?}: use 1-63 letters, digits, '-' and '.' (it becomes a DNS name)")]
    Name(String),
    #[error("certificate signing request: {0}")]
    Request(String),
    #[error("certificate signing request: the key must be Ed25519 (it also signs tokens)")]
    KeyType,
    #[error("lifetime {0:?}: must be between {MIN_LIFETIME:?} and {MAX_LIFETIME:?}")]
    Lifetime(Duration),
    #[error("the stored CA is unusable: {0}")]
    Corrupt(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

#[derive(Serialize, Deserialize)]
struct StoredCa {
    key_pem: String,
    cert_pem: String,
}

/// A certificate the authority issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub not_after_ms: u64,
    /// Hex, for logs and `server status`.
    pub serial: String,
}

/// What an enforcer certificate says about its holder (see [`certified`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certified {
    pub name: String,
    pub spiffe: String,
    pub scope: Scope,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub public_key: Vec<u8>,
}

pub struct Authority {
    trust_domain: String,
    key: KeyPair,
    cert_pem: String,
    cert_der: Vec<u8>,
}

/// A Tessera CA's certificate parameters (validity left to the caller): issues enforcer
/// certificates only (path length 0). Shared by the control plane's authority and the
/// static configuration's `tessera ca init`.
pub fn ca_params(common_name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Tessera");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Whether `name` can name an enforcer: it becomes a DNS name and a SPIFFE path segment.
pub fn check_name(name: &str) -> Result<(), AuthorityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AuthorityError::Name(name.to_string()))
    }
}

/// The SPIFFE name of enforcer `name`; its workloads' names are under it.
pub fn enforcer_spiffe(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/enforcer/{name}")
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, AuthorityError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|e| AuthorityError::Certificate(e.to_string()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| AuthorityError::Certificate(e.to_string()))
}

impl Authority {
    /// The CA in `store`, made on first use. Two servers starting together on one store
    /// agree on one CA: only the first write wins and the other reads it back.
    pub async fn load_or_create(
        store: &dyn Store,
        trust_domain: &str,
    ) -> Result<Self, AuthorityError> {
        if let Some(e) = store.get(CA_KEY).await? {
            return Self::from_stored(trust_domain, &e.value);
        }
        let key = KeyPair::generate_for(&PKCS_ED25519)
            .map_err(|e| AuthorityError::Certificate(e.to_string()))?;
        let mut params = ca_params(&format!("Tessera control plane CA ({trust_domain})"))
            .map_err(|e| AuthorityError::Certificate(e.to_string()))?;
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE)?;
        params.not_after = offset(now + Duration::from_secs(10 * 365 * 24 * 3600))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| AuthorityError::Certificate(e.to_string()))?;
        let stored = serde_json::to_vec(&StoredCa {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
        })
        .expect("serialisable");
        if store.put_if(CA_KEY, stored.clone(), None).await?.is_some() {
            return Self::from_stored(trust_domain, &stored);
        }
        let e = store
            .get(CA_KEY)
            .await?
            .ok_or_else(|| AuthorityError::Corrupt("CA vanished while being created".into()))?;
        Self::from_stored(trust_domain, &e.value)
    }

    fn from_stored(trust_domain: &str, bytes: &[u8]) -> Result<Self, AuthorityError> {
        let bad = |e: String| AuthorityError::Corrupt(e);
        let s: StoredCa = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let key = KeyPair::from_pem(&s.key_pem).map_err(|e| bad(e.to_string()))?;
        let der = pem_der(&s.cert_pem).map_err(bad)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            key,
            cert_pem: s.cert_pem,
            cert_der: der,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate every enforcer trusts (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A certificate for enforcer `name` in `scope` for the key of `csr_pem`, valid from now
    /// for `lifetime`.
    pub fn issue(
        &self,
        csr_pem: &str,
        name: &str,
        scope: &Scope,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        check_name(name)?;
        if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
            return Err(AuthorityError::Lifetime(lifetime));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| AuthorityError::Request(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ED25519 {
            return Err(AuthorityError::KeyType);
        }
        let cert_err = |e: rcgen::Error| AuthorityError::Certificate(e.to_string());
        let spiffe = enforcer_spiffe(&self.trust_domain, name);
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::DnsName(name.try_into().map_err(cert_err)?),
            SanType::URI(spiffe.as_str().try_into().map_err(cert_err)?),
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        if !scope.is_empty() {
            dn.push(DnType::OrganizationalUnitName, scope.to_string());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| AuthorityError::Certificate("no randomness".into()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = offset(now - BACKDATE)?;
        let not_after = now + lifetime;
        params.not_after = offset(not_after)?;
        let issuer =
            Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key).map_err(cert_err)?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(cert_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            // Whole seconds, as the certificate says it.
            not_after_ms: unix_ms(not_after) / 1000 * 1000,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

impl Authority {
    /// A certificate for the control plane's own API, for a key made here (kept in memory
    /// by the server, made anew at each start): server authentication only, so it can
    /// never pass as an enforcer (those need client authentication and a SPIFFE name
    /// under `/enforcer/`). Names may be DNS names or IP addresses.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<(Vec<u8>, Vec<u8>), AuthorityError> {
        let cert_err = |e: rcgen::Error| AuthorityError::Certificate(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(n.as_str().try_into().map_err(cert_err)?),
                });
        }
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/control", self.trust_domain)
                .as_str()
                .try_into()
                .map_err(cert_err)?,
        ));
        params
            .distinguished_name
            .push(DnType::CommonName, "Tessera control plane");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(now - BACKDATE)?;
        params.not_after = offset(now + lifetime)?;
        let issuer =
            Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key).map_err(cert_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }
}

/// The DER of the first certificate in `pem`.
pub fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok(p.contents)
}

/// Reads an enforcer certificate the authority issued: name, SPIFFE name, scope, end of
/// validity and key. It does not check the signature (TLS did, or the caller does).
pub fn certified(cert_der: &[u8]) -> Result<Certified, AuthorityError> {
    use x509_parser::prelude::*;
    let bad = |e: String| AuthorityError::Certificate(e);
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| bad(e.to_string()))?;
    let mut name = None;
    let mut spiffes = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) if name.is_none() => name = Some(d.to_string()),
                GeneralName::URI(u) if u.starts_with("spiffe://") => spiffes.push(u.to_string()),
                _ => {}
            }
        }
    }
    let name = name.ok_or_else(|| bad("no DNS name".into()))?;
    if spiffes.len() > 1 {
        return Err(bad("more than one SPIFFE name".into()));
    }
    let spiffe = spiffes.pop().ok_or_else(|| bad("no SPIFFE name".into()))?;
    if !spiffe.ends_with(&format!("/enforcer/{name}")) {
        return Err(bad(format!(
            "SPIFFE name {spiffe} does not name enforcer {name}"
        )));
    }
    let mut scopes = cert.subject().iter_organizational_unit();
    let scope = match (scopes.next(), scopes.next()) {
        (None, _) => Scope::default(),
        (Some(ou), None) => ou
            .as_str()
            .map_err(|e| bad(e.to_string()))?
            .parse()
            .map_err(|e: crate::scope::ScopeError| bad(e.to_string()))?,
        (Some(_), Some(_)) => return Err(bad("more than one scope".into())),
    };
    Ok(Certified {
        name,
        spiffe,
        scope,
        not_before_ms: cert.validity().not_before.timestamp().max(0) as u64 * 1000,
        not_after_ms: cert.validity().not_after.timestamp() as u64 * 1000,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::Embedded;

    /// An enforcer's key and its signing request, as the enforcer makes them.
    pub fn request(name: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let csr = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (key, csr)
    }

    pub async fn authority() -> (tempfile::TempDir, Embedded, Authority) {
        let dir = tempfile::tempdir().unwrap();
        let store = Embedded::open(&dir.path().join("c.redb")).unwrap();
        let a = Authority::load_or_create(&store, "td").await.unwrap();
        (dir, store, a)
    }

    #[tokio::test]
    async fn issues_scoped_short_lived_certificates_from_the_record_not_the_request() {
        let (_d, _s, a) = authority().await;
        // The request asks for another name; the certificate names the enrolled one.
        let (key, csr) = request("admin.example");
        let scope: Scope = "site=paris,tenant=acme".parse().unwrap();
        let now = SystemTime::now();
        let issued = a
            .issue(&csr, "host-a", &scope, Duration::from_secs(3600), now)
            .unwrap();
        let c = certified(&issued.cert_der).unwrap();
        assert_eq!(c.name, "host-a");
        assert_eq!(c.spiffe, "spiffe://td/enforcer/host-a");
        assert_eq!(c.scope, scope);
        assert_eq!(c.public_key, key.public_key_raw());
        let left = c.not_after_ms as i64 - unix_ms(now) as i64;
        assert!((3_598_000..=3_600_000).contains(&left), "{left}");
        // The proxy's check accepts it as signed by the CA (chain and validity).
        let (_, end) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(a.ca_der()).unwrap();
        end.verify_signature(Some(ca.public_key())).unwrap();
        assert!(!end.is_ca());
    }

    #[tokio::test]
    async fn refuses_bad_names_lifetimes_keys_and_tampered_requests() {
        let (_d, _s, a) = authority().await;
        let (_, csr) = request("x");
        let now = SystemTime::now();
        let s = Scope::default();
        let hour = Duration::from_secs(3600);
        for name in ["", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert!(matches!(
                a.issue(&csr, name, &s, hour, now),
                Err(AuthorityError::Name(_))
            ));
        }
        for life in [Duration::from_secs(1), MAX_LIFETIME * 2] {
            assert!(matches!(
                a.issue(&csr, "x", &s, life, now),
                Err(AuthorityError::Lifetime(_))
            ));
        }
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr256 = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .serialize_request(&p256)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(
            a.issue(&csr256, "x", &s, hour, now),
            Err(AuthorityError::KeyType)
        ));
        // A request whose signature does not match its key (bytes flipped inside).
        let mut der = x509_parser::pem::parse_x509_pem(csr.as_bytes())
            .unwrap()
            .1
            .contents;
        let n = der.len();
        der[n - 10] ^= 0x40;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            a.issue(&tampered, "x", &s, hour, now),
            Err(AuthorityError::Request(_))
        ));
        assert!(matches!(
            a.issue("garbage", "x", &s, hour, now),
            Err(AuthorityError::Request(_))
        ));
    }

    pub fn pem_encode(tag: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {tag}-----\n");
        for chunk in b.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {tag}-----\n"));
        out
    }

    #[tokio::test]
    async fn the_ca_survives_restarts_and_replicas_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let first = {
            let store = Embedded::open(&path).unwrap();
            let (a, b) = tokio::join!(
                Authority::load_or_create(&store, "td"),
                Authority::load_or_create(&store, "td")
            );
            assert_eq!(a.as_ref().unwrap().ca_pem(), b.unwrap().ca_pem());
            a.unwrap().ca_pem().to_string()
        };
        let store = Embedded::open(&path).unwrap();
        let again = Authority::load_or_create(&store, "td").await.unwrap();
        assert_eq!(again.ca_pem(), first);
    }

    #[test]
    fn certified_refuses_certificates_that_contradict_themselves() {
        // A certificate whose SPIFFE name names another enforcer than its DNS name.
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(vec!["host-a".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://td/enforcer/host-b".try_into().unwrap(),
        ));
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert!(certified(&der).unwrap_err().to_string().contains("host-b"));
        // A scope that is not one.
        let mut p = CertificateParams::new(vec!["host-a".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://td/enforcer/host-a".try_into().unwrap(),
        ));
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, "site=paris,site=london");
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert!(certified(&der).is_err());
    }
}
