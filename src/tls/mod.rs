//! TLS settings: the trust the probes use, the certificate the TLS listener serves, and the
//! OTLP client's trust and certificate; their files are re-read when they change (`reload`).

mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::otel::ExportTls;
pub use reload::{Contents, File, Reloader, Swap};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot read certificates from {path}: {source}")]
    ReadCerts { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCerts { path: PathBuf },
    #[error("cannot read private key from {path}: {source}")]
    ReadKey { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: rustls::Error },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The file at fault, if a file is.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::ReadCerts { path, .. }
            | TlsError::NoCerts { path }
            | TlsError::ReadKey { path, .. }
            | TlsError::Key { path, .. } => Some(path),
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

/// Client TLS for the probes. `insecure` only ever loosens [`ProbeTls::general`]. The
/// service-account `ca.crt` and the extra CA are re-read by `reloader` when they change.
pub fn probe_tls(
    service_account_ca: &Path,
    extra_ca: Option<&Path>,
    insecure: bool,
    reloader: &mut Reloader,
) -> Result<ProbeTls, TlsError> {
    let provider = provider();
    let system = system_roots();
    let mut files = vec![File::optional(service_account_ca)];
    files.extend(extra_ca.map(File::required));
    let (sa_path, extra_path) = (service_account_ca.to_owned(), extra_ca.map(Path::to_owned));
    let verifier_provider = provider.clone();
    let trust = reloader.watch("probe trust store", files, move |contents| {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(system.iter().cloned());
        if let Some(bytes) = &contents[0] {
            let (added, _) = roots.add_parsable_certificates(parse_certs(&sa_path, bytes)?);
            if added == 0 {
                return Err(TlsError::NoCerts { path: sa_path.clone() });
            }
        }
        if let (Some(path), Some(Some(bytes))) = (&extra_path, contents.get(1)) {
            let (added, ignored) = roots.add_parsable_certificates(parse_certs(path, bytes)?);
            if added == 0 {
                return Err(TlsError::NoCerts { path: path.clone() });
            }
            if ignored > 0 {
                tracing::warn!(path = %path.display(), ignored, "some extra CA certificates could not be parsed");
            }
        }
        verifier(roots, &verifier_provider)
    })?;
    let verified = client_config(&provider, Arc::new(Trust(trust)), None, b"http/1.1")?;
    let general = if insecure {
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Fixed { provider, accept: true }))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    } else {
        verified.clone()
    };
    Ok(ProbeTls { verified, general })
}

/// Client TLS for an OTLP exporter (`name` in logs): the CA file (re-read when it changes)
/// or the system roots, and the client certificate (re-read too) for mTLS. `alpn` is `h2`
/// for gRPC.
pub fn otlp_client_config(
    name: &str,
    tls: &ExportTls,
    alpn: &[u8],
    reloader: &mut Reloader,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let trust = match &tls.certificate {
        Some(file) => {
            let path = file.path.clone();
            let verifier_provider = provider.clone();
            reloader.watch(format!("{name} CA certificate"), vec![File::required(&file.path)], move |contents| {
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(parse_certs(&path, content(contents, 0))?);
                if added == 0 {
                    return Err(TlsError::NoCerts { path: path.clone() });
                }
                verifier(roots, &verifier_provider)
            })?
        }
        None => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(system_roots().iter().cloned());
            Arc::new(Swap::fixed(verifier(roots, &provider)?))
        }
    };
    let client = match &tls.client {
        Some((cert, key)) => Some(Arc::new(CertifiedKeys(certified_key(
            format!("{name} client certificate"),
            &cert.path,
            &key.path,
            &provider,
            reloader,
        )?))),
        None => None,
    };
    client_config(&provider, Arc::new(Trust(trust)), client, alpn)
}

/// Server TLS for the HTTPS listener; the certificate and key are re-read when they change.
pub fn server_config(cert_file: &Path, key_file: &Path, reloader: &mut Reloader) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let keys = certified_key("listener certificate", cert_file, key_file, &provider, reloader)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertifiedKeys(keys)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    trust: Arc<Trust>,
    client: Option<Arc<CertifiedKeys>>,
    alpn: &[u8],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(trust);
    let mut config = match client {
        Some(client) => builder.with_client_cert_resolver(client),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A certificate chain and its key, checked to belong together, watched by `reloader`.
fn certified_key(
    what: impl Into<String>,
    cert_file: &Path,
    key_file: &Path,
    provider: &Arc<CryptoProvider>,
    reloader: &mut Reloader,
) -> Result<Arc<Swap<CertifiedKey>>, TlsError> {
    let (cert_path, key_path) = (cert_file.to_owned(), key_file.to_owned());
    let provider = provider.clone();
    reloader.watch(what, vec![File::required(cert_file), File::required(key_file)], move |contents| {
        let certs = parse_certs(&cert_path, content(contents, 0))?;
        let key = PrivateKeyDer::from_pem_slice(content(contents, 1))
            .map_err(|source| TlsError::ReadKey { path: key_path.clone(), source })?;
        CertifiedKey::from_der(certs, key, &provider).map_err(|source| TlsError::Key { path: key_path.clone(), source })
    })
}

fn content(contents: &Contents, i: usize) -> &[u8] {
    contents.get(i).and_then(Option::as_deref).unwrap_or_default()
}

/// Verifies against `roots`. With no roots at all (an image without a CA bundle, standalone,
/// no extra CA) every certificate is refused as of an unknown issuer, at the handshake that
/// needs one: plain-HTTP probes and exports still work, and start-up does not fail.
fn verifier(roots: RootCertStore, provider: &Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    if roots.is_empty() {
        return Ok(Arc::new(Fixed { provider: provider.clone(), accept: false }));
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok(verifier)
}

/// The system's CA certificates, read once (they come with the image) and shared by the
/// probe trust and the OTLP exporters.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(error = %error, "skipping unreadable system certificate");
        }
        native.certs
    })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ReadCerts { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts { path: path.to_owned() });
    }
    Ok(certs)
}

/// Verifies server certificates against the latest trust store.
#[derive(Debug)]
struct Trust(Arc<Swap<Arc<dyn ServerCertVerifier>>>);

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.get().verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// The latest certificate and key: served by the listener, or presented to a collector.
#[derive(Debug)]
struct CertifiedKeys(Arc<Swap<CertifiedKey>>);

impl ResolvesServerCert for CertifiedKeys {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

impl ResolvesClientCert for CertifiedKeys {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A verifier with a fixed answer that still checks handshake signatures, so a connection is
/// at least consistent: `accept` for `KUBENURSE_INSECURE=true` (any certificate), refuse for a
/// trust store without roots (no certificate can be verified).
#[derive(Debug)]
struct Fixed {
    provider: Arc<CryptoProvider>,
    accept: bool,
}

impl ServerCertVerifier for Fixed {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.accept {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trust_store_without_roots_builds_and_refuses_every_certificate() {
        let verifier = verifier(RootCertStore::empty(), &provider()).expect("no roots is not a start-up error");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let name = ServerName::try_from("localhost").expect("name");
        let refused = verifier.verify_server_cert(cert.cert.der(), &[], &name, &[], UnixTime::now());
        assert!(
            matches!(refused, Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))),
            "{refused:?}"
        );
    }
}
