//! Cloud instance identity documents: how an enforcer on a cloud VM enrols without a token.
//!
//! Public clouds give every instance a document (instance id, account, region, image, tags)
//! signed by the provider; AWS serves it at `/latest/dynamic/instance-identity/document`
//! with a signature, GCP and Azure as a signed JWT. Tessera's form is the same content,
//! JSON with AWS's field names, signed with Ed25519 by a "provider" key whose certificate
//! the server is configured to trust. The server verifies it offline (no call to the
//! cloud), requires it to be fresh, and trusts each instance id on first use: the first
//! enforcer to enrol with an instance's document owns that instance id, and any later
//! document for it — a copy, or a new one stolen from the instance — is refused.
//!
//! The scope comes from the document, never from the enforcer: `account` and `region`,
//! plus the instance tags the server is configured to carry over (e.g. `site`, `tenant`).
use std::{collections::BTreeMap, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{
    scope::Scope,
    store::{Store, StoreError},
};

const KEY_PREFIX: &str = "instances/";
/// Largest signed document accepted (real ones are about 500 bytes).
pub const MAX_SIZE: usize = 8 * 1024;

/// The document, with AWS's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceDocument {
    pub instance_id: String,
    pub account_id: String,
    pub region: String,
    pub image_id: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// When the provider signed it (Unix seconds).
    pub issued_at: u64,
}

/// A document as the instance receives it: the exact bytes signed, and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDocument {
    /// Base64 of the document's JSON bytes.
    pub document: String,
    /// Base64 of the Ed25519 signature over those bytes.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("identity document: {0}")]
    Malformed(String),
    #[error("identity document is not signed by a trusted provider key")]
    Untrusted,
    #[error(
        "identity document for instance {instance} was issued {age_s} s ago (at most {max_s} s)"
    )]
    Stale {
        instance: String,
        age_s: u64,
        max_s: u64,
    },
    #[error("identity document for instance {0} is dated in the future")]
    Future(String),
    #[error(
        "identity document names instance {document}, but the enforcer says it runs on {claimed}"
    )]
    OtherInstance { document: String, claimed: String },
    #[error("instance {instance} already enrolled enforcer {enforcer}: a document can enrol one")]
    AlreadyEnrolled { instance: String, enforcer: String },
    #[error("identity document for instance {instance}: {field} {value:?} cannot be a scope label")]
    Scope {
        instance: String,
        field: String,
        value: String,
    },
}

/// How the server checks documents (from its configuration).
#[derive(Clone, Debug)]
pub struct DocumentPolicy {
    /// Provider keys (Ed25519, from their certificates) and until when each is valid (ms).
    pub providers: Vec<(VerifyingKey, u64)>,
    /// How old a document may be.
    pub max_age: Duration,
    /// How far in the future its date may be (clock skew).
    pub skew: Duration,
    /// Instance tags carried into the scope, by name.
    pub scope_tags: Vec<String>,
}

impl DocumentPolicy {
    /// A policy trusting the provider certificates in `pem` (one or more).
    pub fn from_pem(pem: &str, max_age: Duration, scope_tags: Vec<String>) -> Result<Self, String> {
        let mut providers = Vec::new();
        for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let p = p.map_err(|e| e.to_string())?;
            let cert = p.parse_x509().map_err(|e| e.to_string())?;
            let raw: [u8; 32] = cert
                .public_key()
                .subject_public_key
                .data
                .as_ref()
                .try_into()
                .map_err(|_| "a provider certificate's key is not Ed25519".to_string())?;
            let key = VerifyingKey::from_bytes(&raw).map_err(|e| e.to_string())?;
            providers.push((key, cert.validity().not_after.timestamp() as u64 * 1000));
        }
        if providers.is_empty() {
            return Err("no certificate".into());
        }
        Ok(Self {
            providers,
            max_age,
            skew: Duration::from_secs(30),
            scope_tags,
        })
    }
}

/// Checks `signed` offline: size, signature by a trusted provider, freshness, that it names
/// the instance the enforcer says it runs on. Returns the document and its scope. Does not
/// record the instance: [`claim_instance`] does, once everything else has passed.
pub fn verify(
    policy: &DocumentPolicy,
    signed: &SignedDocument,
    claimed_instance: &str,
    now_ms: u64,
) -> Result<(InstanceDocument, Scope), DocumentError> {
    let bad = |e: &str| DocumentError::Malformed(e.to_string());
    if signed.document.len() + signed.signature.len() > MAX_SIZE {
        return Err(bad("larger than any real document"));
    }
    let bytes = STANDARD
        .decode(&signed.document)
        .map_err(|_| bad("document is not base64"))?;
    let sig = STANDARD
        .decode(&signed.signature)
        .map_err(|_| bad("signature is not base64"))?;
    let sig = Signature::from_slice(&sig).map_err(|_| bad("signature is not 64 bytes"))?;
    // The signature before the content: nothing unsigned is parsed.
    let trusted = policy
        .providers
        .iter()
        .any(|(key, until)| now_ms < *until && key.verify_strict(&bytes, &sig).is_ok());
    if !trusted {
        return Err(DocumentError::Untrusted);
    }
    let doc: InstanceDocument =
        serde_json::from_slice(&bytes).map_err(|e| DocumentError::Malformed(e.to_string()))?;
    let issued_ms = doc.issued_at.saturating_mul(1000);
    if issued_ms > now_ms + policy.skew.as_millis() as u64 {
        return Err(DocumentError::Future(doc.instance_id));
    }
    let age = now_ms.saturating_sub(issued_ms);
    if age > policy.max_age.as_millis() as u64 {
        return Err(DocumentError::Stale {
            instance: doc.instance_id,
            age_s: age / 1000,
            max_s: policy.max_age.as_secs(),
        });
    }
    if doc.instance_id != claimed_instance {
        return Err(DocumentError::OtherInstance {
            document: doc.instance_id,
            claimed: claimed_instance.to_string(),
        });
    }
    let mut pairs = vec![
        ("account", doc.account_id.as_str()),
        ("region", doc.region.as_str()),
    ];
    for t in &policy.scope_tags {
        if let Some(v) = doc.tags.get(t) {
            pairs.push((t.as_str(), v.as_str()));
        }
    }
    let scope = match Scope::from_pairs(pairs.iter().copied()) {
        Ok(s) => s,
        Err(_) => {
            let (field, value) = pairs
                .iter()
                .find(|(k, v)| Scope::from_pairs([(*k, *v)]).is_err())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .unwrap_or_default();
            return Err(DocumentError::Scope {
                instance: doc.instance_id,
                field,
                value,
            });
        }
    };
    Ok((doc, scope))
}

#[derive(Serialize, Deserialize)]
struct InstanceRecord {
    enforcer: String,
    at_ms: u64,
}

/// Records that `instance` belongs to enforcer `enforcer` — unless an enforcer already owns
/// it (trust on first use; a race has one winner).
pub async fn claim_instance(
    store: &dyn Store,
    instance: &str,
    enforcer: &str,
    now_ms: u64,
) -> Result<(), DocumentError> {
    let key = format!("{KEY_PREFIX}{instance}");
    let rec = serde_json::to_vec(&InstanceRecord {
        enforcer: enforcer.to_string(),
        at_ms: now_ms,
    })
    .expect("serialisable");
    if store.put_if(&key, rec, None).await?.is_some() {
        return Ok(());
    }
    let owner = store
        .get(&key)
        .await?
        .and_then(|e| serde_json::from_slice::<InstanceRecord>(&e.value).ok())
        .map(|r| r.enforcer)
        .unwrap_or_else(|| "another enforcer".into());
    Err(DocumentError::AlreadyEnrolled {
        instance: instance.to_string(),
        enforcer: owner,
    })
}

/// Frees an instance id (its enforcer was removed by an administrator).
pub async fn release_instance(store: &dyn Store, instance: &str) -> Result<bool, StoreError> {
    store.delete(&format!("{KEY_PREFIX}{instance}")).await
}

/// The "provider" side, for tests and demos: signs documents as a cloud would.
pub struct Provider {
    key: SigningKey,
}

impl Provider {
    /// A provider key from PKCS#8 PEM (as `tessera server provider init` writes it).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| e.to_string())
    }

    pub fn sign(&self, doc: &InstanceDocument) -> SignedDocument {
        let bytes = serde_json::to_vec(doc).expect("serialisable");
        SignedDocument {
            signature: STANDARD.encode(self.key.sign(&bytes).to_bytes()),
            document: STANDARD.encode(bytes),
        }
    }
}

/// A new provider: its key (PKCS#8 PEM) and its self-signed certificate (PEM), valid for
/// `days`, to configure as trusted on the server.
pub fn new_provider(name: &str, days: u32) -> Result<(String, String), String> {
    use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ED25519};
    let key = KeyPair::generate_for(&PKCS_ED25519).map_err(|e| e.to_string())?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    p.distinguished_name
        .push(DnType::CommonName, format!("{name} instance identity"));
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::days(days as i64);
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((key.serialize_pem(), cert.pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Embedded;

    const NOW_S: u64 = 1_800_000_000;
    const NOW: u64 = NOW_S * 1000;

    fn provider() -> (Provider, DocumentPolicy) {
        let (key, cert) = new_provider("test-cloud", 1).unwrap();
        let mut policy =
            DocumentPolicy::from_pem(&cert, Duration::from_secs(300), vec!["site".into()]).unwrap();
        // The test's clock is in 2027; the certificate's validity is today's.
        for p in &mut policy.providers {
            p.1 = u64::MAX;
        }
        (Provider::from_pem(&key).unwrap(), policy)
    }

    fn doc(instance: &str, issued_at: u64) -> InstanceDocument {
        InstanceDocument {
            instance_id: instance.into(),
            account_id: "123456789012".into(),
            region: "eu-west-3".into(),
            image_id: "ami-0abc".into(),
            tags: [
                ("site".into(), "paris".into()),
                ("owner".into(), "x y".into()),
            ]
            .into(),
            issued_at,
        }
    }

    #[test]
    fn a_fresh_signed_document_gives_its_scope() {
        let (p, policy) = provider();
        let signed = p.sign(&doc("i-1", NOW_S - 10));
        let (d, scope) = verify(&policy, &signed, "i-1", NOW).unwrap();
        assert_eq!(d.image_id, "ami-0abc");
        // Only the configured tags; "owner" (not a valid label anyway) is not carried.
        assert_eq!(
            scope.to_string(),
            "account=123456789012,region=eu-west-3,site=paris"
        );
    }

    #[test]
    fn stale_future_foreign_forged_tampered_and_truncated_documents_are_refused() {
        let (p, policy) = provider();
        let stale = p.sign(&doc("i-1", NOW_S - 301));
        assert!(matches!(
            verify(&policy, &stale, "i-1", NOW),
            Err(DocumentError::Stale { age_s: 301, .. })
        ));
        let future = p.sign(&doc("i-1", NOW_S + 60));
        assert!(matches!(
            verify(&policy, &future, "i-1", NOW),
            Err(DocumentError::Future(_))
        ));
        let other = p.sign(&doc("i-2", NOW_S));
        assert!(matches!(
            verify(&policy, &other, "i-1", NOW),
            Err(DocumentError::OtherInstance { .. })
        ));
        // Signed by a provider the server does not trust.
        let (rogue, _) = provider();
        assert!(matches!(
            verify(&policy, &rogue.sign(&doc("i-1", NOW_S)), "i-1", NOW),
            Err(DocumentError::Untrusted)
        ));
        // A genuine document with its region edited.
        let good = p.sign(&doc("i-1", NOW_S));
        let mut bytes = STANDARD.decode(&good.document).unwrap();
        let text = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("eu-west-3", "us-east-1");
        bytes = text.into_bytes();
        let tampered = SignedDocument {
            document: STANDARD.encode(&bytes),
            signature: good.signature.clone(),
        };
        assert!(matches!(
            verify(&policy, &tampered, "i-1", NOW),
            Err(DocumentError::Untrusted)
        ));
        let truncated = SignedDocument {
            document: good.document.clone(),
            signature: good.signature[..40].to_string(),
        };
        assert!(matches!(
            verify(&policy, &truncated, "i-1", NOW),
            Err(DocumentError::Malformed(_))
        ));
        let huge = SignedDocument {
            document: "A".repeat(MAX_SIZE),
            signature: good.signature,
        };
        assert!(matches!(
            verify(&policy, &huge, "i-1", NOW),
            Err(DocumentError::Malformed(_))
        ));
        // An expired provider certificate is no longer trusted.
        let mut expired = policy.clone();
        expired.providers[0].1 = NOW - 1;
        assert!(matches!(
            verify(&expired, &good_doc(&p), "i-1", NOW),
            Err(DocumentError::Untrusted)
        ));
    }

    fn good_doc(p: &Provider) -> SignedDocument {
        p.sign(&doc("i-1", NOW_S))
    }

    #[test]
    fn a_tag_that_cannot_be_a_label_is_named() {
        let (p, mut policy) = provider();
        policy.scope_tags.push("owner".into());
        match verify(&policy, &p.sign(&doc("i-1", NOW_S)), "i-1", NOW) {
            Err(DocumentError::Scope { field, value, .. }) => {
                assert_eq!((field.as_str(), value.as_str()), ("owner", "x y"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_instance_enrols_one_enforcer_even_racing() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(
                    async move { claim_instance(&s, "i-1", &format!("host-{i}"), NOW).await },
                )
            })
            .collect();
        let mut owners = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => owners += 1,
                Err(DocumentError::AlreadyEnrolled { instance, .. }) => assert_eq!(instance, "i-1"),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(owners, 1);
        assert!(release_instance(&s, "i-1").await.unwrap());
        claim_instance(&s, "i-1", "host-new", NOW).await.unwrap();
    }
}
