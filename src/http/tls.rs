//! TLS with rustls, both ways: the identity a server presents ([`ServerTls`], from PEM
//! files), the roots a client trusts (the operating system's store plus an optional CA file),
//! and telling a certificate failure apart from any other connection failure.
//!
//! Both sides name their crypto provider (aws-lc-rs, rustls's default) instead of relying on a process-wide default,
//! so an application that links a second provider cannot make a builder panic.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// A TLS certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found wrong.
        reason: String,
    },
    /// The file holds no certificate (`-----BEGIN CERTIFICATE-----`).
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key (PKCS#8, PKCS#1 or SEC1, in PEM).
    #[error("{} holds no PEM private key", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the one the certificate was issued for.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused what the file holds (an unsupported key type, a malformed certificate).
    #[error("{} cannot be used for TLS", path.display())]
    Rejected {
        /// The file.
        path: PathBuf,
        /// What rustls refused.
        #[source]
        source: rustls::Error,
    },
    /// The TLS configuration could not be built from the provider's defaults.
    #[error("cannot set up TLS")]
    Setup(#[source] rustls::Error),
}

/// The crypto provider of every TLS configuration highwater builds.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The bytes of `path`.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in the PEM file `path` (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in the PEM file `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// What a server presents over TLS: its certificate chain and key. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ServerTls")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads a certificate chain (PEM, the server's certificate first, then any
    /// intermediates) and its private key (PEM: PKCS#8, PKCS#1 or SEC1). The server speaks
    /// HTTP/1.1 over TLS 1.2 or 1.3.
    ///
    /// # Errors
    /// A file cannot be read ([`TlsError::Read`]), is not PEM ([`TlsError::Pem`]), holds no
    /// certificate or key ([`TlsError::NoCertificate`], [`TlsError::NoKey`]), the key is not
    /// the certificate's ([`TlsError::KeyMismatch`]), or rustls refuses them
    /// ([`TlsError::Rejected`]).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = certificates(cert)?;
        let secret = private_key(key)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_single_cert(chain, secret)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                },
                // A key rustls cannot load is the key file's fault; anything else (a
                // certificate it cannot parse) the certificate file's.
                e @ rustls::Error::General(_) => TlsError::Rejected {
                    path: key.to_owned(),
                    source: e,
                },
                e => TlsError::Rejected {
                    path: cert.to_owned(),
                    source: e,
                },
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// Uses a rustls configuration built by the application (client certificates, a
    /// certificate resolver...). Its ALPN list should offer `http/1.1` or nothing.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> ServerTls {
        ServerTls { config }
    }

    /// The rustls configuration, for an application that terminates TLS itself in front of
    /// a mounted [`crate::http::HighwaterService`].
    pub fn rustls_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// The operating system's trusted roots, read once per process: reading the store costs
/// milliseconds and it does not change while a node runs.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(%error, "a system trust store entry could not be read");
        }
        if found.certs.is_empty() {
            tracing::warn!("no trusted roots found in the system store: only a CA file given with --ca-file or HIGHWATER_CA_FILE is trusted");
        }
        found.certs
    })
}

/// The client configuration for `https://` nodes: trusts the system's roots (when
/// `system` is set) plus every certificate in the PEM file `ca_file`.
///
/// # Errors
/// The CA file cannot be read, is not PEM, holds no certificate, or holds one rustls
/// cannot use as a root.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    system: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if system {
        // A system root that does not parse is left out, as browsers do: it cannot vouch
        // for anyone, and refusing every connection over it would help no one.
        roots.add_parsable_certificates(system_roots().iter().cloned());
    }
    if let Some(path) = ca_file {
        for cert in certificates(path)? {
            roots.add(cert).map_err(|source| TlsError::Rejected {
                path: path.to_owned(),
                source,
            })?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The certificate failure inside `error`, if it is one: the peer's certificate chain did
/// not verify (unknown issuer, expired, not valid for the name asked for...) or none was
/// presented.
///
/// rustls's error sits inside `std::io::Error`s, whose `source()` skips the error they wrap,
/// so the chain is walked through `io::Error::get_ref` as well.
pub(crate) fn certificate_problem(error: &(dyn StdError + 'static)) -> Option<String> {
    let mut next = Some(error);
    // A bound against a chain that loops back on itself.
    for _ in 0..32 {
        let current = next?;
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return is_certificate_error(tls).then(|| tls.to_string());
        }
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => current.source(),
            },
            None => current.source(),
        };
    }
    None
}

fn is_certificate_error(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType
            | rustls::Error::InvalidCertRevocationList(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_error_is_found_inside_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let outer = std::io::Error::other(inner);
        let found = certificate_problem(&outer);
        assert!(
            found
                .as_deref()
                .is_some_and(|m| m.contains("UnknownIssuer")),
            "{found:?}"
        );
        let handshake = rustls::Error::HandshakeNotComplete;
        let other = std::io::Error::other(std::io::Error::other(handshake));
        assert_eq!(certificate_problem(&other), None);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_problem(&refused), None);
    }

    #[test]
    fn unreadable_and_empty_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"no pem here\n").unwrap();
        assert!(matches!(
            ServerTls::from_pem_files(&missing, &empty),
            Err(TlsError::Read { path, .. }) if path == missing
        ));
        assert!(matches!(
            ServerTls::from_pem_files(&empty, &empty),
            Err(TlsError::NoCertificate { path }) if path == empty
        ));
        assert!(matches!(
            client_config(Some(&empty), false),
            Err(TlsError::NoCertificate { path }) if path == empty
        ));
    }
}
