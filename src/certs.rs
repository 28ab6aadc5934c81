//! Key pairs, certificate signing requests, and a certificate authority for reference servers.
//!
//! Agent keys are ECDSA P-256, generated here and never sent anywhere: the PEM server only sees
//! a CSR. The [`Authority`] is what a reference PEM server (test beds, the sandbox) keeps in its
//! data directory; a real PEM server has its own.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what}: {source}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid name {0:?} for a certificate: {1}")]
    Name(String, String),
}

fn rc<T>(what: &'static str, r: Result<T, rcgen::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Rcgen { what, source })
}

/// A fresh agent key pair. Its PEM form (`serialize_pem`) is PKCS#8 (`BEGIN PRIVATE KEY`).
pub fn generate_key() -> Result<KeyPair, Error> {
    rc(
        "generate an ECDSA P-256 key",
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
    )
}

/// A PEM-encoded CSR whose subject is `CN=<common_name>`, signed by `key`.
pub fn csr_pem(key: &KeyPair, common_name: &str) -> Result<String, Error> {
    let mut params = rc(
        "build the request",
        CertificateParams::new(Vec::<String>::new()),
    )?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = rc("sign the request", params.serialize_request(key))?;
    rc("encode the request", csr.pem())
}

/// How far certificates are dated back, as CAs commonly do: a client whose clock lags behind the
/// server's (by up to a day) still accepts a certificate issued a moment ago.
const BACKDATE: Duration = Duration::days(1);

/// A self-signed CA certificate and its key, both PEM.
#[derive(Clone)]
pub struct Authority {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let key = generate_key()?;
        let mut params = rc("build the CA", CertificateParams::new(Vec::<String>::new()))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(3650);
        let cert = rc("self-sign the CA", params.self_signed(&key))?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid for one year.
    /// Returns (certificate PEM, key PEM).
    pub fn issue_server(&self, names: &[&str]) -> Result<(String, String), Error> {
        self.issue_server_for(names, 365)
    }

    /// A TLS server certificate (`CA:FALSE`, server-auth usage) whose subject alternative
    /// names are `names` (DNS names or IP addresses; the first is also the CommonName), valid
    /// for `days`, with a fresh ECDSA P-256 key. Returns (certificate PEM, key PEM).
    pub fn issue_server_for(&self, names: &[&str], days: u32) -> Result<(String, String), Error> {
        let ca_key = rc("load the CA key", KeyPair::from_pem(&self.key_pem))?;
        let issuer = rc(
            "load the CA certificate",
            Issuer::from_ca_cert_pem(&self.cert_pem, ca_key),
        )?;
        let key = generate_key()?;
        let mut params = rc(
            "build the server certificate",
            CertificateParams::new(Vec::<String>::new()),
        )?;
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    (*n).try_into()
                        .map_err(|e: rcgen::Error| Error::Name(n.to_string(), e.to_string()))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(days));
        let cert = rc(
            "sign the server certificate",
            params.signed_by(&key, &issuer),
        )?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_key_is_pkcs8_and_csr_names_the_user() {
        let key = generate_key().unwrap();
        assert!(
            key.serialize_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let csr = csr_pem(&key, "pem_agent_user1").unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = parsed.params.distinguished_name.get(&DnType::CommonName);
        assert!(matches!(cn, Some(rcgen::DnValue::Utf8String(s)) if s == "pem_agent_user1"));
    }

    #[test]
    fn server_certificate_is_signed_by_the_authority() {
        let ca = Authority::generate("test CA").unwrap();
        let (cert, key) = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("BEGIN PRIVATE KEY"));
        let (_, der) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
        let parsed = der.parse_x509().unwrap();
        let (_, ca_der) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).unwrap();
        let ca_parsed = ca_der.parse_x509().unwrap();
        assert_eq!(parsed.issuer(), ca_parsed.subject());
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("signature by the CA");
    }
}
