//! TLS for every connection coord makes, with libpq's meanings of the
//! connection string's `sslmode` and `sslrootcert`, over rustls (ring
//! provider) through tokio-postgres-rustls. This module only reads the
//! connection string and certificate files; it never connects by itself.
//!
//! | `sslmode` | coord (as libpq) |
//! |---|---|
//! | `disable` | no TLS |
//! | `allow`, `prefer` (default) | TLS when the server offers it, certificate not checked; plain otherwise |
//! | `require` | TLS or fail, certificate not checked; with an explicit `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | TLS, certificate chain checked against the roots, host name not |
//! | `verify-full` | TLS, chain and host name checked |
//!
//! Roots: the PEM file `sslrootcert` names, the operating system's store for
//! `sslrootcert=system`, and when it is absent `~/.postgresql/root.crt` if it
//! exists, else the operating system's store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where trusted root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Roots {
    /// `sslrootcert=PATH`: a PEM file.
    File(PathBuf),
    /// `sslrootcert=system`.
    System,
    /// No `sslrootcert`: `~/.postgresql/root.crt` if it exists, else the system's.
    Default,
}

/// The TLS settings of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub mode: SslMode,
    pub roots: Roots,
}

/// Splits `sslmode` and `sslrootcert` out of a URL or key=value connection
/// string: returns what tokio-postgres parses (with neither) and the settings.
///
/// # Errors
/// A message naming the value when `sslmode` is not one of libpq's.
pub(crate) fn split(url: &str) -> Result<(String, TlsSettings), String> {
    let mut mode = None;
    let mut roots = Roots::Default;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "invalid sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                        ))
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                roots = if value == "system" {
                    Roots::System
                } else {
                    Roots::File(PathBuf::from(value))
                };
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if let Some(scheme_end) = url.find("://") {
        match url[scheme_end..].find('?') {
            None => url.to_owned(),
            Some(q) => {
                let (head, query) = url.split_at(scheme_end + q);
                let mut kept = Vec::new();
                for pair in query[1..].split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(key), &percent_decode(value))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    head.to_owned()
                } else {
                    format!("{head}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            let (key, value) = token.split_once('=').unwrap_or((token, ""));
            if !take(key, value.trim_matches('\''))? {
                kept.push(token);
            }
        }
        kept.join(" ")
    };
    let mut mode = mode.unwrap_or(SslMode::Prefer);
    // libpq: with a root certificate named explicitly, `require` verifies
    // the chain as `verify-ca` does.
    if mode == SslMode::Require && matches!(roots, Roots::File(_)) {
        mode = SslMode::VerifyCa;
    }
    Ok((rest, TlsSettings { mode, roots }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TlsSettings {
    /// tokio-postgres' mode for these settings.
    pub(crate) fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }

    /// The TLS connector for these settings.
    ///
    /// # Errors
    /// A message naming the file when the root certificates cannot be read.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require => {
                Arc::new(Lenient {
                    provider,
                    chain: None,
                })
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("cannot set up certificate verification: {e}"))?;
                if self.mode == SslMode::VerifyCa {
                    Arc::new(Lenient {
                        provider,
                        chain: Some(webpki),
                    })
                } else {
                    webpki
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<RootCertStore, String> {
        let file = match &self.roots {
            Roots::File(path) => Some(path.clone()),
            Roots::System => None,
            Roots::Default => std::env::var_os("HOME")
                .map(|home| Path::new(&home).join(".postgresql/root.crt"))
                .filter(|p| p.exists()),
        };
        let mut store = RootCertStore::empty();
        match file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(&path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {} holds no usable certificate",
                        path.display()
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(
                        "no system root certificates found: pass sslrootcert=PATH in the database URL"
                            .to_owned(),
                    );
                }
            }
        }
        Ok(store)
    }
}

/// The certificate check of `prefer`, `require` (no chain) and `verify-ca`
/// (`chain`: it must lead to a trusted root, the host name is not checked):
/// libpq's meanings. The handshake's signatures are always checked.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    /// `verify-ca`'s verifier; `None` accepts any certificate (as libpq does).
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_settings_are_split_out_of_urls_and_key_value_strings() {
        let (rest, s) = split(
            "postgres://u@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/db?application_name=x");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.roots, Roots::File("/tmp/ca.pem".into()));

        let (rest, s) = split("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(s.mode, SslMode::Require);

        let (rest, s) = split("host=h user=u sslmode=verify-ca sslrootcert=system").unwrap();
        assert_eq!(rest, "host=h user=u");
        assert_eq!((s.mode, s.roots), (SslMode::VerifyCa, Roots::System));

        let (_, s) = split("postgres://u@h/db").unwrap();
        assert_eq!((s.mode, s.roots), (SslMode::Prefer, Roots::Default));
    }

    #[test]
    fn require_with_an_explicit_root_certificate_verifies_the_chain() {
        let (_, s) = split("postgres://h/db?sslmode=require&sslrootcert=ca.pem").unwrap();
        assert_eq!(s.mode, SslMode::VerifyCa);
    }

    #[test]
    fn an_unknown_sslmode_is_refused_by_name() {
        let err = split("postgres://h/db?sslmode=maybe").unwrap_err();
        assert!(err.contains("\"maybe\""), "{err}");
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let (_, s) =
            split("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap();
        let err = s.connector().err().expect("refused");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
