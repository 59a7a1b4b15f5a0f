//! The cluster CA: `tessera ca init` makes one, `tessera ca issue` signs an enforcer's
//! certificate (DNS name = the enforcer's name; usable as TLS client and server).
//! Keys are Ed25519: the enforcer's key also signs identity tokens (64-byte signatures).
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519, SanType, date_time_ymd,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn validity(params: &mut CertificateParams, years: i32) {
    params.not_before = date_time_ymd(2025, 1, 1);
    params.not_after = date_time_ymd(2025 + years, 1, 1);
}

/// Creates `dir/ca.pem` and `dir/ca.key`. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert_path = dir.join(CA_CERT);
    if cert_path.exists() {
        bail!(
            "{} already exists: refusing to replace the cluster CA",
            cert_path.display()
        );
    }
    let key = KeyPair::generate_for(&PKCS_ED25519).context("generating the CA key")?;
    let mut params =
        tessera_control::authority::ca_params(&format!("Tessera cluster CA ({trust_domain})"))?;
    validity(&mut params, 20);
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    write(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// Issues `out/NAME.pem` and `out/NAME.key` for enforcer `name`, signed by the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, name: &str, ips: &[IpAddr], out: &Path) -> Result<(PathBuf, PathBuf)> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        bail!("enforcer name {name:?}: use letters, digits, '-' and '.' (it becomes a DNS name)");
    }
    let ca_cert = ca_dir.join(CA_CERT);
    let ca_key = ca_dir.join(CA_KEY);
    let ca_cert_pem = fs::read_to_string(&ca_cert)
        .with_context(|| format!("cannot read {}", ca_cert.display()))?;
    let ca_key_pem =
        fs::read_to_string(&ca_key).with_context(|| format!("cannot read {}", ca_key.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a PEM private key", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .with_context(|| format!("{}: not a usable CA certificate", ca_cert.display()))?;

    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Tessera");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, 5);
    let cert = params.signed_by(&key, &issuer)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (cert_path, key_path) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}.key")),
    );
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_the_name_and_load_as_mutual_tls() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "test.local").unwrap();
        assert!(
            init(dir.path(), "test.local").is_err(),
            "second init must not replace the CA"
        );
        let (cert, key) = issue(
            dir.path(),
            "host-a",
            &["10.0.0.1".parse().unwrap()],
            dir.path(),
        )
        .unwrap();
        let id =
            tessera_proxy::tls::Credentials::load(&dir.path().join(CA_CERT), &cert, &key).unwrap();
        assert_eq!(
            tessera_proxy::tls::peer_name(&id.chain[0]).as_deref(),
            Some("host-a")
        );
        id.server_config().unwrap();
        id.client_config().unwrap();
        assert!(issue(dir.path(), "bad name!", &[], dir.path()).is_err());
    }
}
