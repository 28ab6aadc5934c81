//! Checks a certificate the server returned before anything is written: it must be strict DER
//! (as OpenSSL, which pgBouncer and PostgreSQL verify it with, reads it), name the agent user,
//! carry our public key, be valid now, allow client authentication, and come from a CA (the
//! one we trust, when a root certificate is configured).

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
    strict_layout(&pem.contents)?;
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

/// Tag, header length and content length of the DER element at the start of `d`.
fn tlv(d: &[u8]) -> Option<(u8, usize, usize)> {
    let tag = *d.first()?;
    let first = *d.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*d.get(2 + i)?);
        }
        (2 + n, len)
    };
    (d.len() >= header + len).then_some((tag, header, len))
}

/// The elements inside a constructed DER element's content.
fn children(content: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        let (tag, header, len) = tlv(rest)?;
        out.push((tag, &rest[..header + len]));
        rest = &rest[header + len..];
    }
    Some(out)
}

/// The certificate is exactly SEQUENCE { tbsCertificate, signatureAlgorithm, signature } with
/// the outer signatureAlgorithm the same bytes as the one inside the signed part (RFC 5280
/// 4.1.1.2), a signature of whole bytes, and nothing after it. x509-parser is lenient about some of this; OpenSSL is not.
fn strict_layout(der: &[u8]) -> Result<(), String> {
    let malformed = || "it is not a well-formed DER certificate".to_string();
    let (tag, header, len) = tlv(der).ok_or_else(malformed)?;
    if tag != 0x30 || header + len != der.len() {
        return Err(malformed());
    }
    let parts = children(&der[header..]).ok_or_else(malformed)?;
    let [(0x30, tbs), (0x30, outer_alg), (0x03, signature)] = parts.as_slice() else {
        return Err(malformed());
    };
    // A signature is whole bytes: no unused bits at the end of its BIT STRING.
    let (_, sig_header, _) = tlv(signature).ok_or_else(malformed)?;
    if signature.get(sig_header) != Some(&0) {
        return Err(malformed());
    }
    let (_, tbs_header, _) = tlv(tbs).ok_or_else(malformed)?;
    let fields = children(&tbs[tbs_header..]).ok_or_else(malformed)?;
    let mut fields = fields.iter().skip_while(|(t, _)| *t == 0xa0);
    let inner_alg = match (fields.next(), fields.next()) {
        (Some((0x02, _)), Some((0x30, alg))) => alg,
        _ => return Err(malformed()),
    };
    if inner_alg != outer_alg {
        return Err("its two signature algorithm fields differ".into());
    }
    Ok(())
}

/// Checks PEM's locally issued agent files (`-o agent_ssl_crt=... -o agent_ssl_key=...`)
/// before registration touches the server: both readable, the key private (libpq refuses
/// others), the key the certificate's, the certificate for `agent_user`, valid now and issued
/// by a CA in `root` (the PEM CA the admin's session verified the server with).
pub fn check_files(
    crt: &Path,
    key: &Path,
    agent_user: &str,
    root: Option<&Path>,
) -> Result<(), super::Error> {
    use openssl::pkey::PKey;
    use openssl::x509::X509;
    use std::os::unix::fs::PermissionsExt;
    let invalid = |what: &'static str, path: &Path, why: String| super::Error::Invalid {
        what,
        value: path.display().to_string(),
        why,
    };
    let crt_what = "-o agent_ssl_crt";
    let key_what = "-o agent_ssl_key";
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|e| invalid(what, path, format!("cannot read it: {e}")))
    };
    let crt_pem = read(crt_what, crt)?;
    let key_pem = read(key_what, key)?;
    let mode = std::fs::metadata(key)
        .map_err(|e| invalid(key_what, key, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(invalid(
            key_what,
            key,
            format!(
                "it has group or world access (mode {:04o}); run chmod 600 {}",
                mode & 0o7777,
                key.display()
            ),
        ));
    }
    let cert = X509::from_pem(&crt_pem)
        .map_err(|_| invalid(crt_what, crt, "not a PEM certificate".into()))?;
    let pkey = PKey::private_key_from_pem(&key_pem).map_err(|_| {
        invalid(
            key_what,
            key,
            "not an unencrypted PEM private key (PKCS#8 or PKCS#1)".into(),
        )
    })?;
    let public = cert
        .public_key()
        .map_err(|e| invalid(crt_what, crt, e.to_string()))?;
    if !public.public_eq(&pkey) {
        return Err(invalid(
            key_what,
            key,
            format!("it is not the key of {}", crt.display()),
        ));
    }
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .unwrap_or_default();
    if cn != agent_user {
        return Err(invalid(
            crt_what,
            crt,
            format!(
                "its common name is {cn:?}, but the agent logs in as {agent_user} (--pem-agent-user, or agent<N> with -o agent_id=N)"
            ),
        ));
    }
    let now = openssl::asn1::Asn1Time::days_from_now(0)
        .map_err(|e| invalid(crt_what, crt, e.to_string()))?;
    if cert.not_before() > now || cert.not_after() < now {
        return Err(invalid(
            crt_what,
            crt,
            format!(
                "it is not valid now (from {} to {})",
                cert.not_before(),
                cert.not_after()
            ),
        ));
    }
    let Some(root) = root else {
        return Err(invalid(
            crt_what,
            crt,
            "cannot check it was issued by the PEM CA: give the PEM server's root certificate with --pem-ssl-root-cert (or PGSSLROOTCERT)".into(),
        ));
    };
    let cas = std::fs::read(root)
        .ok()
        .and_then(|d| X509::stack_from_pem(&d).ok())
        .unwrap_or_default();
    let signed = cas.iter().any(|ca| {
        ca.subject_name()
            .try_cmp(cert.issuer_name())
            .is_ok_and(|o| o.is_eq())
            && ca
                .public_key()
                .is_ok_and(|k| cert.verify(&k).unwrap_or(false))
    });
    if !signed {
        return Err(invalid(
            crt_what,
            crt,
            format!(
                "it was not issued by the PEM CA (no CA in {} signed it)",
                root.display()
            ),
        ));
    }
    Ok(())
}
