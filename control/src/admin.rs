//! Administrator credentials: bearer tokens whose hashes the store keeps.
//!
//! The first start of a server writes one to a file only its user can read (0600); whoever
//! can read that file administers the control plane (create join tokens, apply policy,
//! revoke enforcers). Comparison is of SHA-256 digests looked up by key, so the secret
//! itself is never compared byte by byte or stored.
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

const KEY_PREFIX: &str = "admin/tokens/";
pub const PREFIX: &str = "tsa1.";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("administrator token refused")]
    Refused,
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

#[derive(Serialize, Deserialize)]
struct AdminRecord {
    name: String,
    created_ms: u64,
}

fn hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes an administrator token named `name`; the secret is returned once.
pub async fn create(store: &dyn Store, name: &str, now_ms: u64) -> Result<String, AdminError> {
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| StoreError::Backend("no randomness".into()))?;
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let rec = AdminRecord {
        name: name.to_string(),
        created_ms: now_ms,
    };
    store
        .put(
            &format!("{KEY_PREFIX}{}", hash(&token)),
            serde_json::to_vec(&rec).expect("serialisable"),
        )
        .await?;
    Ok(token)
}

/// The name of the administrator whose token this is.
pub async fn check(store: &dyn Store, token: &str) -> Result<String, AdminError> {
    if !token.trim().starts_with(PREFIX) || token.len() > 128 {
        return Err(AdminError::Refused);
    }
    let e = store
        .get(&format!("{KEY_PREFIX}{}", hash(token)))
        .await?
        .ok_or(AdminError::Refused)?;
    let rec: AdminRecord = serde_json::from_slice(&e.value).map_err(|_| AdminError::Refused)?;
    Ok(rec.name)
}

/// Reads a token file, refusing one that others can read or that another user owns.
pub fn read_file(path: &Path) -> Result<String, AdminError> {
    let err = |reason: String| AdminError::File {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(err(format!(
            "mode {:o}: others can read it; chmod 600",
            meta.permissions().mode() & 0o777
        )));
    }
    let me = nix_uid();
    if std::os::unix::fs::MetadataExt::uid(&meta) != me {
        return Err(err("owned by another user".into()));
    }
    let s = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    Ok(s.trim().to_string())
}

fn nix_uid() -> u32 {
    // SAFETY: getuid cannot fail and has no preconditions.
    unsafe { libc::getuid() }
}

/// Writes `token` to `path`, mode 0600, refusing to replace an existing file.
pub fn write_file(path: &Path, token: &str) -> Result<(), AdminError> {
    let err = |reason: String| AdminError::File {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    writeln!(f, "{token}").map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Embedded;

    #[tokio::test]
    async fn only_issued_tokens_pass_and_files_must_be_private() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        let t = create(&s, "admin", 1).await.unwrap();
        assert_eq!(check(&s, &t).await.unwrap(), "admin");
        assert_eq!(check(&s, &format!("{t}\n")).await.unwrap(), "admin");
        let mut forged = t.clone();
        forged.pop();
        forged.push('x');
        for bad in [forged.as_str(), "", "tsa1.", "Bearer x", &"a".repeat(4096)] {
            assert!(
                matches!(check(&s, bad).await, Err(AdminError::Refused)),
                "{bad}"
            );
        }
        let path = d.path().join("admin.token");
        write_file(&path, &t).unwrap();
        assert_eq!(read_file(&path).unwrap(), t);
        assert!(write_file(&path, &t).is_err(), "never replaced");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_file(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }
}
