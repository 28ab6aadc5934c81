//! The TLS connector for one set of settings: libpq's sslmode semantics on native-tls.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use native_tls::{Certificate, Identity, TlsConnector};
use postgres_native_tls::MakeTlsConnector;

use super::{ConnectSettings, Error, SslMode};

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn connector(s: &ConnectSettings) -> Result<MakeTlsConnector, Error> {
    let mut b = TlsConnector::builder();
    // libpq: with `require` and a root certificate present, the chain is verified (verify-ca).
    // TLS is never negotiated on a Unix socket (as in libpq), so nothing is verified there.
    let verify_chain = !s.is_unix_socket() && s.sslmode.verifies(s.root_cert.is_some());
    if verify_chain {
        let Some(root) = &s.root_cert else {
            return Err(Error::NoRootCert {
                mode: s.sslmode,
                target: s.target(),
            });
        };
        let pem = read("root certificate", root)?;
        let certs = Certificate::stack_from_pem(&pem)
            .map_err(|e| Error::Tls(format!("root certificate {}: {e}", root.display())))?;
        if certs.is_empty() {
            return Err(Error::Tls(format!(
                "root certificate {} holds no certificate",
                root.display()
            )));
        }
        for c in certs {
            b.add_root_certificate(c);
        }
        // Only the given CA may vouch for the server, as with libpq's sslrootcert.
        b.disable_built_in_roots(true);
        if s.sslmode != SslMode::VerifyFull {
            b.danger_accept_invalid_hostnames(true);
        }
    } else {
        b.danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    if let Some((cert, key)) = &s.client_cert {
        let mode = std::fs::metadata(key)
            .map_err(|source| Error::ReadFile {
                what: "private key",
                path: key.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::KeyPermissions { path: key.clone() });
        }
        let cert_pem = read("client certificate", cert)?;
        let key_pem = read("private key", key)?;
        let identity = Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
            Error::Tls(format!(
                "client certificate {} with key {}: {e} (the key must be PKCS#8, BEGIN PRIVATE KEY)",
                cert.display(),
                key.display()
            ))
        })?;
        b.identity(identity);
    }
    let connector = b
        .build()
        .map_err(|e| Error::Tls(format!("cannot build the TLS connector: {e}")))?;
    Ok(MakeTlsConnector::new(connector))
}
