//! TLS roots for the connections to Home Assistant: the system store (honouring
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`, see `rustls-native-certs`) plus the optional `ha.ca_file`
//! for a self-signed HA. Built once and shared by the WebSocket (futures-rustls) and REST
//! (ureq) clients, with the `ring` provider (no OpenSSL, no aws-lc).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Largest `ha.ca_file` read, bytes: a full system CA bundle is about 220 KB.
const CA_FILE_LIMIT: u64 = 4 * 1024 * 1024;

/// Failure to set up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `ha.ca_file` could not be read or holds no certificate.
    #[error("failed to load CA file {path} (ha.ca_file): {message}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// No root certificate at all (no system store and no `ca_file`).
    #[error("no TLS root certificates: install ca-certificates or set ha.ca_file")]
    NoRoots,
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The root certificates, loaded once.
#[derive(Debug, Clone)]
pub struct Roots {
    /// DER certificates: system roots first, then `ca_file`.
    certs: Arc<Vec<CertificateDer<'static>>>,
}

impl Roots {
    /// Loads the system roots and `ca_file`. System-store errors are logged, not fatal, as
    /// long as some root is left.
    ///
    /// Errors: [`TlsError::CaFile`] when `ca_file` is set but unusable; [`TlsError::NoRoots`].
    pub fn load(ca_file: Option<&Path>) -> Result<Roots, TlsError> {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            log::debug!("skipping part of the system certificate store: {e}");
        }
        let mut certs = native.certs;
        if let Some(path) = ca_file {
            let err = |message: String| TlsError::CaFile {
                path: path.display().to_string(),
                message,
            };
            // Never a FIFO or device, never more than a CA bundle could hold (files.rs).
            let pem =
                crate::files::read_regular(path, CA_FILE_LIMIT).map_err(|e| err(e.to_string()))?;
            let extra: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| err(e.to_string()))?;
            if extra.is_empty() {
                return Err(err("no PEM certificate in the file".into()));
            }
            certs.extend(extra);
        }
        if certs.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(Roots {
            certs: Arc::new(certs),
        })
    }

    /// The ring crypto provider (explicit, so a second provider in the tree cannot make
    /// rustls panic on an ambiguous default).
    pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A rustls client config for the WebSocket.
    ///
    /// Errors: [`TlsError::Rustls`].
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(self.certs.iter().cloned());
        if ignored > 0 {
            log::debug!("ignored {ignored} unparsable root certificates ({added} loaded)");
        }
        let config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The same roots for ureq (`RootCerts::Specific` replaces ureq's bundled roots).
    pub fn ureq_tls(&self) -> ureq::tls::TlsConfig {
        let certs: Vec<ureq::tls::Certificate<'static>> = self
            .certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Self::provider())
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
            .build()
    }
}
