//! A certificate authority and a server certificate made inside a test (rcgen), written as
//! PEM files: what `serve --tls-cert/--tls-key` and a client's CA file take. Included with
//! `#[path]` by the tests that need TLS.
#![allow(dead_code)]

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What a test returns.
type CertResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A CA and one server certificate it issued, as PEM files in a temporary directory.
pub struct Pki {
    /// The CA's certificate (what a client trusts).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// Holds the files.
    pub dir: tempfile::TempDir,
}

/// A new CA, and a server certificate from it for `names` (DNS names or IP addresses).
pub fn pki(names: &[&str]) -> CertResult<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "highwater test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "highwater test node");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;

    let dir = tempfile::tempdir()?;
    let write = |name: &str, pem: String| -> CertResult<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    Ok(Pki {
        ca: write("ca.pem", ca_cert.pem())?,
        cert: write("cert.pem", cert.pem())?,
        key: write("key.pem", key.serialize_pem())?,
        dir,
    })
}

/// A CA and a certificate for `127.0.0.1` and `localhost`.
pub fn loopback() -> CertResult<Pki> {
    pki(&["127.0.0.1", "localhost"])
}
