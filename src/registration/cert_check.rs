//! Checks a certificate the server returned before anything is written: it must name the agent
//! user, carry our public key, be valid now, allow client authentication, and come from a CA
//! (the one we trust, when a root certificate is configured).

use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use x509_parser::pem::Pem;
use x509_parser::prelude::*;

pub fn check(
    cert_pem: &str,
    key: &KeyPair,
    agent_user: &str,
    root: Option<&Path>,
) -> Result<(), String> {
    let (_, pem) =
        parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("not a PEM certificate ({e})"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("");
    if cn != agent_user {
        return Err(format!("its common name is {cn:?}"));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err("it does not carry the key generated for it".into());
    }
    if !cert.validity().is_valid() {
        return Err(format!(
            "it is not valid now (from {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        ));
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth || eku.value.any => {}
        Ok(None) => {}
        _ => return Err("it does not allow TLS client authentication".into()),
    }
    if cert.subject() == cert.issuer() {
        return Err("it is self-signed".into());
    }
    if let Some(root) = root {
        let data = std::fs::read(root)
            .map_err(|e| format!("cannot read root certificate {}: {e}", root.display()))?;
        let signed = Pem::iter_from_buffer(&data)
            .filter_map(Result::ok)
            .any(|p| {
                p.parse_x509()
                    .is_ok_and(|ca| cert.verify_signature(Some(ca.public_key())).is_ok())
            });
        if !signed {
            return Err(format!("it was not issued by a CA in {}", root.display()));
        }
    }
    Ok(())
}
