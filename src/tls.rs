//! TLS settings: the trust the probes use, and the certificate the TLS listener serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {source}")]
    ReadCerts { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCerts { path: PathBuf },
    #[error("cannot read private key from {path}: {source}")]
    ReadKey { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The file at fault, if a file is.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::ReadCerts { path, .. } | TlsError::NoCerts { path } | TlsError::ReadKey { path, .. } => {
                Some(path)
            }
            TlsError::Rustls(_) => None,
        }
    }
}

/// The crypto provider every TLS user in the process shares.
pub fn provider() -> Arc<CryptoProvider> {
    // Installing the process default lets the kube client (which asks for it) agree with us;
    // a second install fails harmlessly.
    let _ = ring::default_provider().install_default();
    Arc::new(ring::default_provider())
}

/// The probes' two client TLS configurations.
pub struct ProbeTls {
    /// Verifies against the system roots, the service-account `ca.crt` (when present) and
    /// `KUBENURSE_EXTRA_CA`, always: for the apiserver probes, which carry the bearer token.
    pub verified: ClientConfig,
    /// The same trust, or none at all with `KUBENURSE_INSECURE`: for every other target.
    pub general: ClientConfig,
}

/// Client TLS for the probes. `insecure` only ever loosens [`ProbeTls::general`].
pub fn probe_tls(service_account_ca: &Path, extra_ca: Option<&Path>, insecure: bool) -> Result<ProbeTls, TlsError> {
    let provider = provider();
    let verified = verifying_config(&provider, service_account_ca, extra_ca)?;
    let general = if insecure {
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    } else {
        verified.clone()
    };
    Ok(ProbeTls { verified, general })
}

fn verifying_config(
    provider: &Arc<CryptoProvider>,
    service_account_ca: &Path,
    extra_ca: Option<&Path>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(error = %error, "skipping unreadable system certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if service_account_ca.is_file() {
        roots.add_parsable_certificates(read_certs(service_account_ca)?);
    }
    if let Some(path) = extra_ca {
        let (added, ignored) = roots.add_parsable_certificates(read_certs(path)?);
        if added == 0 {
            return Err(TlsError::NoCerts { path: path.to_owned() });
        }
        if ignored > 0 {
            tracing::warn!(path = %path.display(), ignored, "some extra CA certificates could not be parsed");
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Server TLS for the HTTPS listener.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|source| TlsError::ReadKey { path: key_file.to_owned(), source })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCerts { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts { path: path.to_owned() });
    }
    Ok(certs)
}

/// `KUBENURSE_INSECURE=true`: accept any certificate, but still check handshake signatures
/// so the connection is at least consistent.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
