//! The control plane's operations, independent of how requests arrive: enrolment, renewal,
//! what an enforcer reports, revocation, administrators. The server (`tessera server`)
//! wraps these in an API over mutual TLS; tests call them directly.
//!
//! Enrolment checks the cheap things first (rate, name, signing request), then reserves the
//! name, then spends the credential, then issues: a request that fails late leaves no
//! half-enrolled enforcer behind, and a token is only put back when the failure was ours.
use std::{
    net::IpAddr,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, SystemTime},
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::{
    authority::{self, Authority, AuthorityError, Certified, unix_ms},
    document::{self, DocumentError, DocumentPolicy, SignedDocument},
    registry::{self, EnforcerRecord, Method, RegistryError, Serves, State},
    scope::Scope,
    store::{Store, StoreError},
    tokens::{self, TokenError},
};

/// Sources tracked by the per-source enrolment limit before old ones are forgotten.
const MAX_SOURCES: usize = 65_536;

#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    /// Lifetime of enforcer certificates.
    pub lifetime: Duration,
    /// Cloud identity documents, if the server accepts them.
    pub documents: Option<DocumentPolicy>,
    /// Enrolment attempts per second from one address, and in all.
    pub enrol_per_source: NonZeroU32,
    pub enrol_total: NonZeroU32,
}

impl Settings {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            lifetime: Duration::from_secs(3600),
            documents: None,
            enrol_per_source: NonZeroU32::new(5).unwrap(),
            enrol_total: NonZeroU32::new(500).unwrap(),
        }
    }
}

/// How an enforcer proves it may join.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    Token(String),
    Document {
        document: SignedDocument,
        /// The instance the enforcer runs on (from its own metadata service).
        instance: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub name: String,
    /// PEM certificate signing request for the enforcer's Ed25519 key.
    pub csr: String,
    pub credential: Credential,
}

/// What an enrolled or renewed enforcer receives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enrolment {
    pub name: String,
    pub spiffe: String,
    pub scope: Scope,
    pub cert: String,
    pub ca: String,
    pub not_after_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("too many enrolment attempts from {0}: slow down")]
    RateLimited(IpAddr),
    #[error("too many enrolment attempts: slow down")]
    Busy,
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("this control plane does not accept identity documents")]
    NoDocuments,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enforcer {0}: this certificate's key was replaced by a renewal; use the new one")]
    Superseded(String),
}

impl EnrolError {
    /// Whether the enforcer may try again later with the same credential.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            EnrolError::RateLimited(_) | EnrolError::Busy | EnrolError::Store(_)
        )
    }
}

pub struct ControlPlane {
    store: Arc<dyn Store>,
    authority: Authority,
    settings: Settings,
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    total: DefaultDirectRateLimiter,
    /// Claims of networks go one at a time through this server (they are atomic in the
    /// store anyway: this only spares retries, each of which reads the whole registry).
    claims: tokio::sync::Mutex<()>,
    /// The fleet map as last served.
    fleet_map: crate::fleet::MapCache,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ControlPlane {
    pub async fn new(store: Arc<dyn Store>, settings: Settings) -> Result<Self, AuthorityError> {
        let authority = Authority::load_or_create(store.as_ref(), &settings.trust_domain).await?;
        let per_source = RateLimiter::keyed(
            Quota::per_second(settings.enrol_per_source).allow_burst(
                settings
                    .enrol_per_source
                    .saturating_mul(NonZeroU32::new(2).unwrap()),
            ),
        );
        let total = RateLimiter::direct(Quota::per_second(settings.enrol_total));
        Ok(Self {
            claims: tokio::sync::Mutex::new(()),
            fleet_map: Default::default(),
            store,
            authority,
            settings,
            per_source,
            total,
        })
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, shared (for tasks that outlive a request).
    pub fn store_arc(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn limit(&self, from: IpAddr) -> Result<(), EnrolError> {
        if self.per_source.len() > MAX_SOURCES {
            self.per_source.retain_recent();
        }
        self.per_source
            .check_key(&from)
            .map_err(|_| EnrolError::RateLimited(from))?;
        self.total.check().map_err(|_| EnrolError::Busy)
    }

    fn enrolment(&self, name: &str, scope: Scope, issued: authority::Issued) -> Enrolment {
        Enrolment {
            name: name.to_string(),
            spiffe: authority::enforcer_spiffe(&self.settings.trust_domain, name),
            scope,
            cert: issued.cert_pem,
            ca: self.authority.ca_pem().to_string(),
            not_after_ms: issued.not_after_ms,
        }
    }

    /// Enrols a new enforcer that connected from `from`.
    pub async fn enrol(
        &self,
        from: IpAddr,
        req: &EnrolRequest,
        now: SystemTime,
    ) -> Result<Enrolment, EnrolError> {
        self.limit(from)?;
        let now_ms = unix_ms(now);
        authority::check_name(&req.name)?;
        // A throwaway issue checks the request before anything is spent.
        self.authority.issue(
            &req.csr,
            &req.name,
            &Scope::default(),
            self.settings.lifetime,
            now,
        )?;
        let method = match &req.credential {
            Credential::Token(t) => {
                Method::Token(tokens::token_id(t).ok_or(TokenError::Malformed)?)
            }
            Credential::Document { instance, .. } => Method::Document(instance.clone()),
        };
        registry::reserve(self.store(), &req.name, &Scope::default(), method, now_ms).await?;
        let scope = match self.spend(&req.name, &req.credential, now_ms).await {
            Ok(scope) => scope,
            Err(e) => {
                self.store().delete(&registry::key(&req.name)).await?;
                return Err(e);
            }
        };
        let issued =
            match self
                .authority
                .issue(&req.csr, &req.name, &scope, self.settings.lifetime, now)
            {
                Ok(i) => i,
                Err(e) => {
                    self.store().delete(&registry::key(&req.name)).await?;
                    if let Credential::Token(t) = &req.credential {
                        tokens::release(self.store(), t, &req.name).await?;
                    }
                    return Err(e.into());
                }
            };
        let key = hex(&authority::certified(&issued.cert_der)?.public_key);
        let (cert, serial, until) = (
            issued.cert_pem.clone(),
            issued.serial.clone(),
            issued.not_after_ms,
        );
        let sc = scope.clone();
        registry::update(self.store(), &req.name, move |r| {
            r.state = State::Active;
            r.scope = sc.clone();
            r.cert_pem = cert.clone();
            r.cert_serial = serial.clone();
            r.cert_not_after_ms = until;
            r.public_key = key.clone();
            r.last_seen_ms = now_ms;
            Ok(())
        })
        .await?;
        tracing::info!(enforcer = %req.name, %scope, %from, "enrolled");
        Ok(self.enrolment(&req.name, scope, issued))
    }

    async fn spend(&self, name: &str, c: &Credential, now_ms: u64) -> Result<Scope, EnrolError> {
        match c {
            Credential::Token(t) => Ok(tokens::redeem(self.store(), t, name, now_ms).await?),
            Credential::Document { document, instance } => {
                let policy = self
                    .settings
                    .documents
                    .as_ref()
                    .ok_or(EnrolError::NoDocuments)?;
                let (_, scope) = document::verify(policy, document, instance, now_ms)?;
                document::claim_instance(self.store(), instance, name, now_ms).await?;
                Ok(scope)
            }
        }
    }

    /// The record of the enforcer presenting `cert` (already verified by TLS), if it is
    /// active and `cert` is for its current key.
    pub async fn check_enforcer(&self, cert: &Certified) -> Result<EnforcerRecord, EnrolError> {
        let (r, _) = registry::get(self.store(), &cert.name).await?;
        match r.state {
            State::Active => {}
            State::Revoked => return Err(RegistryError::Revoked(r.name).into()),
            State::Enrolling => return Err(RegistryError::Unknown(r.name).into()),
        }
        if r.public_key != hex(&cert.public_key) {
            return Err(EnrolError::Superseded(r.name));
        }
        Ok(r)
    }

    /// A new certificate for the enforcer presenting `cert`, for the key of `csr` (the same
    /// key or a new one). Its scope is the record's, whatever the old certificate said.
    pub async fn renew(
        &self,
        cert: &Certified,
        csr: &str,
        now: SystemTime,
    ) -> Result<Enrolment, EnrolError> {
        let r = self.check_enforcer(cert).await?;
        let issued = self
            .authority
            .issue(csr, &r.name, &r.scope, self.settings.lifetime, now)?;
        let key = hex(&authority::certified(&issued.cert_der)?.public_key);
        let old = hex(&cert.public_key);
        let (pem, serial, until) = (
            issued.cert_pem.clone(),
            issued.serial.clone(),
            issued.not_after_ms,
        );
        let now_ms = unix_ms(now);
        let name = r.name.clone();
        registry::update(self.store(), &r.name, move |rec| {
            if rec.state != State::Active {
                return Err(RegistryError::Revoked(rec.name.clone()));
            }
            // Two renewals racing with one old key: only the first replaces it.
            if rec.public_key != old {
                return Err(RegistryError::Invalid {
                    name: name.clone(),
                    what: "renewed concurrently".into(),
                });
            }
            rec.cert_pem = pem.clone();
            rec.cert_serial = serial.clone();
            rec.cert_not_after_ms = until;
            rec.public_key = key.clone();
            rec.last_seen_ms = now_ms;
            Ok(())
        })
        .await?;
        tracing::info!(enforcer = %r.name, not_after_ms = issued.not_after_ms, "renewed");
        Ok(self.enrolment(&r.name, r.scope, issued))
    }

    /// The fleet map as JSON (made again only when a report changed).
    pub async fn fleet_map_json(&self) -> Result<bytes::Bytes, crate::fleet::FleetError> {
        self.fleet_map.json(self.store()).await
    }

    /// Records what the enforcer presenting `cert` serves and the policy it enforces.
    pub async fn report(
        &self,
        cert: &Certified,
        serves: &Serves,
        policy_version: u64,
        now: SystemTime,
    ) -> Result<(), EnrolError> {
        let current = self.check_enforcer(cert).await?;
        // Reading every record is O(fleet): only when what it serves changed (a periodic
        // report usually says the same again).
        if current.serves != *serves {
            let _one_at_a_time = self.claims.lock().await;
            registry::claim_serves(self.store(), &cert.name, serves).await?;
        }
        let key = hex(&cert.public_key);
        let now_ms = unix_ms(now);
        registry::update(self.store(), &cert.name, |r| {
            if r.state != State::Active || r.public_key != key {
                return Err(RegistryError::Revoked(r.name.clone()));
            }
            r.serves = serves.clone();
            r.policy_version = policy_version;
            r.last_seen_ms = now_ms;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Revokes enforcer `name`: it leaves the directory at once and cannot renew.
    pub async fn revoke(&self, name: &str, now: SystemTime) -> Result<EnforcerRecord, EnrolError> {
        let r = registry::revoke(self.store(), name, unix_ms(now)).await?;
        tracing::warn!(enforcer = %name, "revoked");
        Ok(r)
    }

    /// Forgets enforcer `name` (after revocation, to let the name or instance enrol again).
    pub async fn remove(&self, name: &str) -> Result<(), EnrolError> {
        let (r, _) = registry::get(self.store(), name).await?;
        if r.state == State::Active {
            return Err(RegistryError::Invalid {
                name: name.to_string(),
                what: "revoke it before removing it".into(),
            }
            .into());
        }
        if let Method::Document(instance) = &r.method {
            document::release_instance(self.store(), instance).await?;
        }
        self.store().delete(&registry::key(name)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authority::tests::request,
        document::{InstanceDocument, Provider, new_provider},
        store::Embedded,
    };

    async fn plane(docs: bool) -> (tempfile::TempDir, ControlPlane, Option<Provider>) {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Embedded::open(&d.path().join("c.redb")).unwrap());
        let mut s = Settings::new("td");
        let mut provider = None;
        if docs {
            let (key, cert) = new_provider("cloud", 1).unwrap();
            s.documents = Some(
                DocumentPolicy::from_pem(&cert, Duration::from_secs(300), vec!["site".into()])
                    .unwrap(),
            );
            provider = Some(Provider::from_pem(&key).unwrap());
        }
        s.enrol_per_source = NonZeroU32::new(1000).unwrap();
        s.enrol_total = NonZeroU32::new(10_000).unwrap();
        (d, ControlPlane::new(store, s).await.unwrap(), provider)
    }

    fn ip() -> IpAddr {
        "192.0.2.1".parse().unwrap()
    }

    async fn token(p: &ControlPlane, scope: &str) -> String {
        tokens::create(
            p.store(),
            &scope.parse().unwrap(),
            Duration::from_secs(60),
            unix_ms(SystemTime::now()),
        )
        .await
        .unwrap()
        .secret
    }

    fn certified_of(e: &Enrolment) -> Certified {
        authority::certified(&authority::pem_der(&e.cert).unwrap()).unwrap()
    }

    /// Enforcer `name` enrolled with a fresh token, as its certificate presents it.
    async fn enrolled(p: &ControlPlane, name: &str, now: SystemTime) -> Certified {
        let (_k, csr) = request(name);
        let e = p
            .enrol(
                ip(),
                &EnrolRequest {
                    name: name.into(),
                    csr,
                    credential: Credential::Token(token(p, "").await),
                },
                now,
            )
            .await
            .unwrap();
        certified_of(&e)
    }

    #[tokio::test]
    async fn enrol_by_token_then_renew_rotates_the_key_and_the_old_one_is_dead() {
        let (_d, p, _) = plane(false).await;
        let t = token(&p, "site=paris").await;
        let (_k, csr) = request("host-a");
        let now = SystemTime::now();
        let req = EnrolRequest {
            name: "host-a".into(),
            csr,
            credential: Credential::Token(t.clone()),
        };
        let e = p.enrol(ip(), &req, now).await.unwrap();
        assert_eq!(e.scope.to_string(), "site=paris");
        let c1 = certified_of(&e);
        assert_eq!(c1.scope, e.scope);
        // The same token again, even for another name, is refused and names the first user.
        let (_k2, csr2) = request("host-b");
        let again = EnrolRequest {
            name: "host-b".into(),
            csr: csr2.clone(),
            credential: Credential::Token(t),
        };
        match p.enrol(ip(), &again, now).await {
            Err(EnrolError::Token(TokenError::Used { by, .. })) => assert_eq!(by, "host-a"),
            other => panic!("{other:?}"),
        }
        // ...and leaves no trace of host-b.
        assert!(registry::get(p.store(), "host-b").await.is_err());
        // Renewal with a new key; then the old certificate can neither renew nor report.
        let (_k3, csr3) = request("host-a");
        let r = p.renew(&c1, &csr3, now).await.unwrap();
        let c2 = certified_of(&r);
        assert_ne!(c2.public_key, c1.public_key);
        assert!(matches!(
            p.renew(&c1, &csr3, now).await,
            Err(EnrolError::Superseded(_))
        ));
        assert!(matches!(
            p.report(&c1, &Serves::default(), 1, now).await,
            Err(EnrolError::Superseded(_))
        ));
        p.report(&c2, &Serves::default(), 1, now).await.unwrap();
        // Revoked: no renewal, no report, not in the directory.
        p.revoke("host-a", now).await.unwrap();
        assert!(matches!(
            p.renew(&c2, &csr3, now).await,
            Err(EnrolError::Registry(RegistryError::Revoked(_)))
        ));
        let (rec, _) = registry::get(p.store(), "host-a").await.unwrap();
        assert!(rec.entry().is_none());
    }

    #[tokio::test]
    async fn a_late_failure_spends_nothing_and_a_taken_name_spends_nothing() {
        let (_d, p, _) = plane(false).await;
        let t = token(&p, "").await;
        let (_k, csr) = request("x");
        let now = SystemTime::now();
        // A bad request is refused before the token is spent.
        let bad = EnrolRequest {
            name: "host-a".into(),
            csr: "not a request".into(),
            credential: Credential::Token(t.clone()),
        };
        assert!(matches!(
            p.enrol(ip(), &bad, now).await,
            Err(EnrolError::Authority(_))
        ));
        let ok = EnrolRequest {
            name: "host-a".into(),
            csr: csr.clone(),
            credential: Credential::Token(t),
        };
        p.enrol(ip(), &ok, now).await.unwrap();
        // A second enforcer asking for the same name with a fresh token keeps its token.
        let t2 = token(&p, "").await;
        let dup = EnrolRequest {
            name: "host-a".into(),
            csr: csr.clone(),
            credential: Credential::Token(t2.clone()),
        };
        assert!(matches!(
            p.enrol(ip(), &dup, now).await,
            Err(EnrolError::Registry(RegistryError::Taken(_)))
        ));
        let other = EnrolRequest {
            name: "host-b".into(),
            csr,
            credential: Credential::Token(t2),
        };
        p.enrol(ip(), &other, now).await.unwrap();
    }

    #[tokio::test]
    async fn enrol_by_document_once_per_instance() {
        let (_d, p, provider) = plane(true).await;
        let provider = provider.unwrap();
        let now = SystemTime::now();
        let doc = InstanceDocument {
            instance_id: "i-0abc".into(),
            account_id: "111122223333".into(),
            region: "eu-west-3".into(),
            image_id: "ami-1".into(),
            tags: [("site".into(), "paris".into())].into(),
            issued_at: unix_ms(now) / 1000,
        };
        let signed = provider.sign(&doc);
        let (_k, csr) = request("x");
        let req = |name: &str, instance: &str| EnrolRequest {
            name: name.into(),
            csr: csr.clone(),
            credential: Credential::Document {
                document: signed.clone(),
                instance: instance.into(),
            },
        };
        let e = p.enrol(ip(), &req("vm-1", "i-0abc"), now).await.unwrap();
        assert_eq!(
            e.scope.to_string(),
            "account=111122223333,region=eu-west-3,site=paris"
        );
        // The same document for a second enforcer, and for another instance.
        assert!(matches!(
            p.enrol(ip(), &req("vm-2", "i-0abc"), now).await,
            Err(EnrolError::Document(DocumentError::AlreadyEnrolled { .. }))
        ));
        assert!(matches!(
            p.enrol(ip(), &req("vm-3", "i-other"), now).await,
            Err(EnrolError::Document(DocumentError::OtherInstance { .. }))
        ));
        assert!(registry::get(p.store(), "vm-2").await.is_err());
        // Removed by an administrator, the instance may enrol again.
        assert!(
            p.remove("vm-1").await.is_err(),
            "active enforcers are revoked first"
        );
        p.revoke("vm-1", now).await.unwrap();
        p.remove("vm-1").await.unwrap();
        p.enrol(ip(), &req("vm-1", "i-0abc"), now).await.unwrap();
        // A server without document trust says so.
        let (_d2, plain, _) = plane(false).await;
        assert!(matches!(
            plain.enrol(ip(), &req("vm-9", "i-0abc"), now).await,
            Err(EnrolError::NoDocuments)
        ));
    }

    #[tokio::test]
    async fn enrolment_attempts_are_rate_limited_per_source() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Embedded::open(&d.path().join("c.redb")).unwrap());
        let mut s = Settings::new("td");
        s.enrol_per_source = NonZeroU32::new(2).unwrap();
        let p = ControlPlane::new(store, s).await.unwrap();
        let req = EnrolRequest {
            name: "x".into(),
            csr: "bad".into(),
            credential: Credential::Token("bad".into()),
        };
        let now = SystemTime::now();
        let mut limited = 0;
        for _ in 0..50 {
            if matches!(
                p.enrol(ip(), &req, now).await,
                Err(EnrolError::RateLimited(_))
            ) {
                limited += 1;
            }
        }
        // A burst of 4 gets through to be refused on its merits; the rest are cut off early.
        assert!(limited >= 45, "{limited}");
        // Another source is not held back by the first.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!matches!(
            p.enrol(other, &req, now).await,
            Err(EnrolError::RateLimited(_))
        ));
    }

    #[tokio::test]
    async fn an_enforcer_cannot_report_another_enforcers_networks() {
        let (_d, p, _) = plane(false).await;
        let now = SystemTime::now();
        let certs = [enrolled(&p, "a", now).await, enrolled(&p, "b", now).await];
        let nets = |n: &str| Serves {
            serves: vec![n.parse().unwrap()],
            ..Default::default()
        };
        p.report(&certs[0], &nets("10.1.0.0/24"), 3, now)
            .await
            .unwrap();
        assert!(matches!(
            p.report(&certs[1], &nets("10.1.0.9/32"), 3, now).await,
            Err(EnrolError::Registry(RegistryError::Overlap { .. }))
        ));
        let (a, _) = registry::get(p.store(), "a").await.unwrap();
        assert_eq!(a.policy_version, 3);
        // Once "a" is revoked its claim no longer holds the network.
        p.revoke("a", now).await.unwrap();
        p.report(&certs[1], &nets("10.1.0.9/32"), 3, now)
            .await
            .unwrap();
    }

    /// Two enforcers claiming overlapping networks at the same moment through two replicas
    /// on one store: exactly one claim stands, whatever the interleaving.
    #[tokio::test]
    async fn racing_reports_of_overlapping_networks_leave_at_most_one_claim() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Embedded::open(&d.path().join("c.redb")).unwrap());
        let settings = || {
            let mut s = Settings::new("td");
            s.enrol_per_source = NonZeroU32::new(1000).unwrap();
            s
        };
        let p = ControlPlane::new(store.clone(), settings()).await.unwrap();
        let replica = ControlPlane::new(store, settings()).await.unwrap();
        let now = SystemTime::now();
        let nets = |n: &str| Serves {
            serves: vec![n.parse().unwrap()],
            ..Default::default()
        };
        for round in 0..8 {
            let certs = [
                enrolled(&p, &format!("a{round}"), now).await,
                enrolled(&p, &format!("b{round}"), now).await,
            ];
            let net = format!("10.{}.0.0/24", 50 + round);
            let claim = nets(&net);
            let (a, b) = tokio::join!(
                p.report(&certs[0], &claim, 1, now),
                replica.report(&certs[1], &claim, 1, now)
            );
            let won = [a.is_ok(), b.is_ok()].iter().filter(|w| **w).count();
            assert_eq!(won, 1, "round {round}: {a:?} {b:?}");
            let loser = if a.is_ok() { b } else { a };
            assert!(
                matches!(
                    loser,
                    Err(EnrolError::Registry(RegistryError::Overlap { .. }))
                ),
                "{loser:?}"
            );
            let holders = registry::all(p.store())
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.serves.serves == nets(&net).serves)
                .count();
            assert_eq!(holders, 1, "round {round}");
        }
    }
}
