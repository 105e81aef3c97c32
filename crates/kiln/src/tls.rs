//! TLS on Kiln's one gRPC port (rustls with the `ring` provider, which
//! builds with the Rust toolchain alone): the server's certificate and key,
//! the optional CA for executors' client certificates, and the client side
//! shared by `kiln executor` and `kiln bench` (`grpcs://` addresses, a
//! private CA or the system's roots, a client certificate). Every PEM file
//! is read and parsed here, at start-up, so a bad one stops the process
//! with an error naming it instead of failing the first handshake.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// A client that opens a connection and never finishes the handshake
/// gives up its connection slot after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM text of `path` if it holds at least one certificate, else an
/// error naming the file and the flag or setting it came from.
fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{what} {}", path.display()))?;
    let parsed: Result<Vec<CertificateDer<'_>>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match parsed {
        Ok(certificates) if !certificates.is_empty() => Ok(pem),
        Ok(_) => anyhow::bail!(
            "{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ),
        Err(e) => anyhow::bail!("{what} {}: not a PEM certificate: {e}", path.display()),
    }
}

/// The PEM text of `path` if it holds a private key, else an error naming
/// the file (never its content).
fn private_key(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{what} {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow::anyhow!("{what} {}: no PEM private key: {e}", path.display()))?;
    Ok(pem)
}

/// The server's TLS settings as files (`[tls]` in the config); `None`
/// when `cert` and `key` are both unset (plaintext).
pub fn server_config(
    cert: &str,
    key: &str,
    client_ca: &str,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => {
            ensure!(
                client_ca.is_empty(),
                "tls.client_ca (--tls-client-ca) needs TLS: set tls.cert and tls.key \
                 (--tls-cert, --tls-key) too"
            );
            return Ok(None);
        }
        (false, true) => {
            anyhow::bail!("tls.cert (--tls-cert) is set but tls.key (--tls-key) is not")
        }
        (true, false) => {
            anyhow::bail!("tls.key (--tls-key) is set but tls.cert (--tls-cert) is not")
        }
        (false, false) => {}
    }
    let identity = Identity::from_pem(
        certificates(Path::new(cert), "tls.cert (--tls-cert)")?,
        private_key(Path::new(key), "tls.key (--tls-key)")?,
    );
    let mut config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if !client_ca.is_empty() {
        // Optional at the TLS layer: REAPI clients such as Bazel connect
        // without a certificate; the executor session demands one (and
        // rustls has checked any that is presented against this CA).
        config = config
            .client_ca_root(Certificate::from_pem(certificates(
                Path::new(client_ca),
                "tls.client_ca (--tls-client-ca)",
            )?))
            .client_auth_optional(true);
    }
    // Building the acceptor pairs the key with the certificate; done here
    // so a mismatch is refused at start, naming both files.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| anyhow::anyhow!("tls.cert {cert} with tls.key {key}: {}", error_chain(&e)))?;
    Ok(Some(config))
}

/// `error` and its sources, as one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How a Kiln client reaches a `grpcs://` server: shared by `kiln
/// executor` and `kiln bench`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM file of the CA(s) that signed a `grpcs://` server's certificate
    /// (default: the system's roots).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one of
    /// executors (`--tls-client-ca`); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    fn any(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }

    /// The rustls client settings these flags describe.
    fn client_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(path) => {
                config.ca_certificate(Certificate::from_pem(certificates(path, "--tls-ca")?))
            }
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(
                certificates(cert, "--tls-cert")?,
                private_key(key, "--tls-key")?,
            ));
        }
        Ok(config)
    }
}

/// The endpoint for a server given as `grpc://HOST:PORT` (plaintext) or
/// `grpcs://HOST:PORT` (TLS; `http://` and `https://` are taken too). TLS
/// flags with a plaintext address are refused, so a typo never sends in
/// the clear what the user meant to protect.
pub fn endpoint(server: &str, tls: &ClientTlsArgs) -> anyhow::Result<Endpoint> {
    let (secure, authority) = if let Some(rest) = server.strip_prefix("grpcs://") {
        (true, rest)
    } else if let Some(rest) = server.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = server.strip_prefix("grpc://") {
        (false, rest)
    } else if let Some(rest) = server.strip_prefix("http://") {
        (false, rest)
    } else {
        anyhow::bail!("server address {server}: expected grpc://HOST:PORT or grpcs://HOST:PORT")
    };
    let authority = authority.trim_end_matches('/');
    let scheme = if secure { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
        .with_context(|| format!("server address {server}"))?;
    if !secure {
        ensure!(
            !tls.any(),
            "server address {server} is plaintext (grpc://), but TLS flags \
             (--tls-ca, --tls-cert, --tls-key) are given: use grpcs://"
        );
        return Ok(endpoint);
    }
    endpoint
        .tls_config(tls.client_config()?)
        .with_context(|| format!("TLS settings for {server}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_flags_with_a_plaintext_address_are_refused() {
        let tls = ClientTlsArgs {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let error = endpoint("grpc://127.0.0.1:1985", &tls).unwrap_err();
        assert!(error.to_string().contains("use grpcs://"), "{error}");
        assert!(endpoint("grpc://127.0.0.1:1985", &ClientTlsArgs::default()).is_ok());
        assert!(endpoint("127.0.0.1:1985", &ClientTlsArgs::default()).is_err());
    }

    #[test]
    fn a_missing_or_malformed_pem_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let tls = ClientTlsArgs {
            tls_ca: Some(junk.clone()),
            ..Default::default()
        };
        let error = endpoint("grpcs://127.0.0.1:1985", &tls).unwrap_err();
        assert!(
            format!("{error:#}").contains(&junk.display().to_string()),
            "{error:#}"
        );
        let missing = dir.path().join("missing.pem");
        let error =
            server_config(missing.to_str().unwrap(), junk.to_str().unwrap(), "").unwrap_err();
        assert!(
            format!("{error:#}").contains(&missing.display().to_string()),
            "{error:#}"
        );
        assert!(server_config("", "", "").unwrap().is_none());
        assert!(server_config("", "", junk.to_str().unwrap()).is_err());
    }
}
