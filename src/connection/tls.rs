//! TLS for sessions: libpq's sslmode semantics on OpenSSL, one context per configuration.
//!
//! A TLS context (the root certificate store, the client certificate and key, the protocol
//! settings) is built once for each set of TLS settings and kept in a small process-wide
//! cache, so opening a session costs a handshake and nothing else. The files it was built from
//! are looked at (one `stat` each) whenever a session is opened; a root certificate, client
//! certificate or key replaced on disk, or a reload naming other files, gives a new context.
//!
//! The context starts empty: the only certificates that may vouch for a server are those of the
//! configured root certificate file (libpq's sslrootcert). The system's CA bundle is never
//! loaded, since the agent never trusts it. That is why this module builds on the `openssl`
//! crate directly: native-tls and postgres-openssl both start from OpenSSL's
//! `SslConnector::builder`, which parses the whole system bundle (about 140 certificates, tens
//! of milliseconds and a few hundred kilobytes of heap) every time, even when it is thrown away
//! right after. The handshake and SCRAM channel binding (`tls-server-end-point`) are done as
//! postgres-openssl does them, on tokio-openssl.

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context as TaskContext, Poll};

use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode as OpenSslMode, SslOptions,
    SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use openssl::x509::verify::X509CheckFlags;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::ChannelBinding;

use super::{ConnectSettings, Error, SslMode};

/// Contexts kept: one per distinct TLS setup in use (the PEM server, each kind of monitored
/// target); more only after reloads, so the oldest can go.
const CACHE_SIZE: usize = 8;

/// OpenSSL's defaults minus what no PostgreSQL server needs (as `SslConnector` chooses).
const CIPHERS: &str = "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK";

/// What a context is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    /// The server's certificate must chain to `root`.
    verify_chain: bool,
    /// ... and name the host dialled (verify-full).
    verify_host: bool,
    root: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

impl Key {
    fn of(s: &ConnectSettings) -> Key {
        // libpq: with `require` and a root certificate present, the chain is verified
        // (verify-ca). TLS is never negotiated on a Unix socket (as in libpq), so nothing is
        // verified there.
        let verify_chain = !s.is_unix_socket() && s.sslmode.verifies(s.root_cert.is_some());
        Key {
            verify_chain,
            verify_host: verify_chain && s.sslmode == SslMode::VerifyFull,
            root: verify_chain.then(|| s.root_cert.clone()).flatten(),
            client: s.client_cert.clone(),
        }
    }

    fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        let root = self.root.iter().map(|p| ("root certificate", p.as_path()));
        let client = self.client.iter().flat_map(|(c, k)| {
            [
                ("client certificate", c.as_path()),
                ("private key", k.as_path()),
            ]
        });
        root.chain(client)
    }
}

/// A file's identity and age on disk: a replaced or rewritten file has another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Looks at the key's files: their stamps, and the private key's mode (checked at every
/// session, as libpq does, not only when the context is built).
fn stamps(key: &Key) -> Result<Vec<Stamp>, Error> {
    key.files()
        .map(|(what, path)| {
            let m = std::fs::metadata(path).map_err(|source| Error::ReadFile {
                what,
                path: path.to_path_buf(),
                source,
            })?;
            if what == "private key" && m.permissions().mode() & 0o077 != 0 {
                return Err(Error::KeyPermissions {
                    path: path.to_path_buf(),
                });
            }
            Ok(Stamp {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })
        })
        .collect()
}

struct Entry {
    key: Key,
    stamps: Vec<Stamp>,
    context: Arc<Context>,
}

/// Most recently used last.
static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Held shared while a context's files are looked at and read, and alone while a client key and
/// certificate are replaced as a pair ([`replace_files`]): two renames are not one, and no
/// session of this process may load the new key with the old certificate in between.
static FILES: RwLock<()> = RwLock::new(());

/// Runs `replace` (which renames files into place) while no context is being built.
pub fn replace_files<T>(replace: impl FnOnce() -> T) -> T {
    let _alone = FILES.write().unwrap_or_else(|p| p.into_inner());
    replace()
}

/// Built contexts so far (the tests watch that sessions do not build new ones).
static BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many TLS contexts this process has built.
pub fn contexts_built() -> u64 {
    BUILT.load(std::sync::atomic::Ordering::Relaxed)
}

/// A TLS context with the settings' root certificate, client certificate and checks.
pub struct Context {
    ssl: SslContext,
    verify_host: bool,
}

/// The context for `s`: the cached one if its files did not change, else a new one.
pub(super) fn context(s: &ConnectSettings) -> Result<Arc<Context>, Error> {
    let key = Key::of(s);
    let _files = FILES.read().unwrap_or_else(|p| p.into_inner());
    let now = stamps(&key)?;
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cache.iter().position(|e| e.key == key) {
            if cache[i].stamps == now {
                let e = cache.remove(i);
                let context = e.context.clone();
                cache.push(e);
                return Ok(context);
            }
            tracing::info!(
                "TLS files changed on disk ({}); loading them again",
                key.files()
                    .map(|(_, p)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            cache.remove(i);
        }
    }
    // Built without the lock held: reading files must not hold up sessions with a cached
    // context. Two sessions racing here both build; the later one is kept.
    let context = Arc::new(build(&key, s)?);
    BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|e| e.key != key);
    if cache.len() >= CACHE_SIZE {
        cache.remove(0);
    }
    cache.push(Entry {
        key,
        stamps: now,
        context: context.clone(),
    });
    Ok(context)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn build(key: &Key, s: &ConnectSettings) -> Result<Context, Error> {
    let tls = |e: openssl::error::ErrorStack| {
        Error::Tls(format!("cannot set up TLS: {}", one_line_stack(&e)))
    };
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(tls)?;
    let mut options = SslOptions::ALL
        | SslOptions::NO_COMPRESSION
        | SslOptions::NO_SSLV2
        | SslOptions::NO_SSLV3
        | SslOptions::SINGLE_DH_USE
        | SslOptions::SINGLE_ECDH_USE;
    options &= !SslOptions::DONT_INSERT_EMPTY_FRAGMENTS;
    b.set_options(options);
    // RELEASE_BUFFERS gives an idle session's read and write buffers back: the agent keeps
    // sessions open between rounds.
    b.set_mode(
        OpenSslMode::AUTO_RETRY
            | OpenSslMode::ACCEPT_MOVING_WRITE_BUFFER
            | OpenSslMode::ENABLE_PARTIAL_WRITE
            | OpenSslMode::RELEASE_BUFFERS,
    );
    // Read whole TCP segments at once, not each record's header and body apart.
    b.set_read_ahead(true);
    b.set_cipher_list(CIPHERS).map_err(tls)?;
    // libpq's ssl_min_protocol_version default.
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls)?;
    if key.verify_chain {
        let Some(root) = &key.root else {
            return Err(Error::NoRootCert {
                mode: s.sslmode,
                target: s.target(),
            });
        };
        let pem = read("root certificate", root)?;
        let certs = X509::stack_from_pem(&pem).map_err(|e| {
            Error::Tls(format!(
                "root certificate {}: {}",
                root.display(),
                one_line_stack(&e)
            ))
        })?;
        if certs.is_empty() {
            return Err(Error::Tls(format!(
                "root certificate {} holds no certificate",
                root.display()
            )));
        }
        // The context's store starts empty: only the given CA may vouch for the server.
        let store = b.cert_store_mut();
        for c in certs {
            store.add_cert(c).map_err(|e| {
                Error::Tls(format!(
                    "root certificate {}: {}",
                    root.display(),
                    one_line_stack(&e)
                ))
            })?;
        }
        b.set_verify(SslVerifyMode::PEER);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    if let Some((cert, key_file)) = &key.client {
        set_identity(&mut b, cert, key_file)?;
    }
    Ok(Context {
        ssl: b.build(),
        verify_host: key.verify_host,
    })
}

/// Loads the client certificate (with its chain) and key into `b`. OpenSSL reads the key in
/// any of its PEM forms: PKCS#8 (`BEGIN PRIVATE KEY`, as this agent writes keys) and the
/// traditional ones (`BEGIN RSA PRIVATE KEY`, `BEGIN EC PRIVATE KEY`), as PEM's tooling and
/// `openssl genrsa -traditional` write them.
fn set_identity(b: &mut SslContextBuilder, cert: &Path, key_file: &Path) -> Result<(), Error> {
    let cert_pem = read("client certificate", cert)?;
    let key_pem = read("private key", key_file)?;
    let bad = |e: openssl::error::ErrorStack| {
        Error::Tls(format!(
            "client certificate {} with key {}: {}",
            cert.display(),
            key_file.display(),
            one_line_stack(&e)
        ))
    };
    let mut chain = X509::stack_from_pem(&cert_pem).map_err(bad)?.into_iter();
    let leaf = chain.next().ok_or_else(|| {
        Error::Tls(format!(
            "client certificate {} holds no certificate",
            cert.display()
        ))
    })?;
    let pkey = PKey::private_key_from_pem(&key_pem).map_err(bad)?;
    b.set_certificate(&leaf).map_err(bad)?;
    for c in chain {
        b.add_extra_chain_cert(c).map_err(bad)?;
    }
    b.set_private_key(&pkey).map_err(bad)?;
    b.check_private_key().map_err(bad)
}

/// Whether a session could present `cert` with `key_file`: the key's mode (0600, as libpq
/// wants), both files readable by OpenSSL, and the key the certificate's.
pub fn check_identity(cert: &Path, key_file: &Path) -> Result<(), Error> {
    stamps(&Key {
        verify_chain: false,
        verify_host: false,
        root: None,
        client: Some((cert.to_path_buf(), key_file.to_path_buf())),
    })?;
    let mut b = SslContextBuilder::new(SslMethod::tls_client())
        .map_err(|e| Error::Tls(format!("cannot set up TLS: {}", one_line_stack(&e))))?;
    set_identity(&mut b, cert, key_file)
}

impl Context {
    /// A TLS session to `host`, ready for its handshake: SNI for host names, and with
    /// verify-full the host name (or IP address) the certificate must name.
    pub(super) fn session(&self, host: &str) -> Result<Ssl, Error> {
        let tls = |e: openssl::error::ErrorStack| {
            Error::Tls(format!(
                "cannot set up TLS for {host}: {}",
                one_line_stack(&e)
            ))
        };
        let mut ssl = Ssl::new(&self.ssl).map_err(tls)?;
        let ip = host.parse::<IpAddr>().ok();
        if ip.is_none() && !host.starts_with('/') {
            ssl.set_hostname(host).map_err(tls)?;
        }
        if self.verify_host {
            let param = ssl.param_mut();
            param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
            match ip {
                Some(ip) => param.set_ip(ip),
                None => param.set_host(host),
            }
            .map_err(tls)?;
        }
        Ok(ssl)
    }
}

/// Why a handshake failed: in words, with the certificate check's verdict when that is what
/// failed, and what it says about certificates (for the error that names the file to fix).
pub(super) struct HandshakeError {
    pub why: String,
    pub failure: Option<super::guard::TlsFailure>,
}

/// Runs the handshake on `stream`.
pub(super) async fn handshake<S>(ssl: Ssl, stream: S) -> Result<TlsStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut s = tokio_openssl::SslStream::new(ssl, stream).map_err(|e| HandshakeError {
        why: one_line_stack(&e),
        failure: None,
    })?;
    match Pin::new(&mut s).connect().await {
        Ok(()) => Ok(TlsStream(s)),
        Err(e) => {
            let mut why = match e.ssl_error() {
                Some(stack) => one_line_stack(stack),
                None => e.to_string(),
            };
            let verdict = s.ssl().verify_result();
            if verdict != openssl::x509::X509VerifyResult::OK {
                why.push_str(&format!(": {}", verdict.error_string()));
            }
            let failure = super::guard::tls_failure(&e);
            Err(HandshakeError { why, failure })
        }
    }
}

/// OpenSSL's error queue on one line, each entry once.
fn one_line_stack(e: &openssl::error::ErrorStack) -> String {
    let mut parts: Vec<String> = Vec::new();
    for err in e.errors() {
        let text = err
            .reason()
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        if !parts.contains(&text) {
            parts.push(text);
        }
    }
    if parts.is_empty() {
        return "unknown TLS error".into();
    }
    parts.join(": ")
}

/// A TLS stream to the server.
pub struct TlsStream<S>(tokio_openssl::SslStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the hash of the server's certificate, with the hash
    /// of its signature algorithm (SHA-256 in place of MD5 and SHA-1).
    fn channel_binding(&self) -> ChannelBinding {
        let Some(cert) = self.0.ssl().peer_certificate() else {
            return ChannelBinding::none();
        };
        let Some(algorithms) = cert
            .signature_algorithm()
            .object()
            .nid()
            .signature_algorithms()
        else {
            return ChannelBinding::none();
        };
        let md = match algorithms.digest {
            Nid::MD5 | Nid::SHA1 => MessageDigest::sha256(),
            nid => match MessageDigest::from_nid(nid) {
                Some(md) => md,
                None => return ChannelBinding::none(),
            },
        };
        match cert.digest(md) {
            Ok(digest) => ChannelBinding::tls_server_end_point(digest.to_vec()),
            Err(_) => ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Authority;

    fn write(path: &Path, text: &str, mode: u32) {
        // Replaced as registration replaces files: a new file renamed over the old one.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn settings(dir: &Path, mode: SslMode) -> ConnectSettings {
        let mut s = ConnectSettings::from_env("db.example.org", 5432, "agent1", "pem").unwrap();
        s.sslmode = mode;
        s.root_cert = Some(dir.join("root.crt"));
        s.client_cert = Some((dir.join("agent1.crt"), dir.join("agent1.key")));
        s
    }

    #[test]
    fn a_context_is_built_once_and_again_when_its_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("test CA").unwrap();
        let (crt, key) = ca.issue_server(&["agent1"]).unwrap();
        write(&dir.path().join("root.crt"), &ca.cert_pem, 0o644);
        write(&dir.path().join("agent1.crt"), &crt, 0o644);
        write(&dir.path().join("agent1.key"), &key, 0o600);
        let s = settings(dir.path(), SslMode::VerifyFull);

        let first = context(&s).unwrap();
        let again = context(&s).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "a second session built a new context"
        );
        // Other settings with the same files share nothing but are cached too.
        let ca_only = settings(dir.path(), SslMode::VerifyCa);
        let other = context(&ca_only).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(Arc::ptr_eq(&other, &context(&ca_only).unwrap()));

        // A new root certificate on disk (another CA): a new context, then cached again.
        let ca2 = Authority::generate("second CA").unwrap();
        write(&dir.path().join("root.crt"), &ca2.cert_pem, 0o644);
        let renewed = context(&s).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "the new root was not loaded"
        );
        assert!(Arc::ptr_eq(&renewed, &context(&s).unwrap()));

        // A key rewritten in place, as an editor would.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (crt2, key2) = ca.issue_server(&["agent1"]).unwrap();
        write(&dir.path().join("agent1.crt"), &crt2, 0o644);
        std::fs::write(dir.path().join("agent1.key"), &key2).unwrap();
        let rekeyed = context(&s).unwrap();
        assert!(
            !Arc::ptr_eq(&renewed, &rekeyed),
            "the new key was not loaded"
        );

        // The key's mode is checked at every session, cached context or not.
        std::fs::set_permissions(
            dir.path().join("agent1.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = context(&s).err().expect("a readable key is refused");
        assert!(matches!(err, Error::KeyPermissions { .. }), "{err}");
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("test CA").unwrap();
        let (crt, _) = ca.issue_server(&["agent1"]).unwrap();
        let (_, other_key) = ca.issue_server(&["agent1"]).unwrap();
        write(&dir.path().join("root.crt"), &ca.cert_pem, 0o644);
        write(&dir.path().join("agent1.crt"), &crt, 0o644);
        write(&dir.path().join("agent1.key"), &other_key, 0o600);
        let err = context(&settings(dir.path(), SslMode::VerifyFull))
            .err()
            .expect("a mismatched key is refused")
            .to_string();
        assert!(
            err.contains("client certificate") && err.contains("agent1.key"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    /// An RSA key as `openssl genrsa -traditional` (and PEM's sslutils before 1.4.1) write it,
    /// with a certificate for it signed by the CA: (certificate PEM, PKCS#1 key PEM).
    fn rsa_identity(ca: &Authority, cn: &str) -> (String, String) {
        use openssl::rsa::Rsa;
        use openssl::x509::X509NameBuilder;
        let rsa = Rsa::generate(2048).unwrap();
        let pkcs1 = String::from_utf8(rsa.private_key_to_pem().unwrap()).unwrap();
        let pkey = PKey::from_rsa(rsa).unwrap();
        let ca_key = PKey::private_key_from_pem(ca.key_pem.as_bytes()).unwrap();
        let ca_cert = X509::from_pem(ca.cert_pem.as_bytes()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(ca_cert.subject_name()).unwrap();
        b.set_pubkey(&pkey).unwrap();
        let serial = openssl::bn::BigNum::from_u32(7)
            .unwrap()
            .to_asn1_integer()
            .unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(365).unwrap())
            .unwrap();
        b.sign(&ca_key, MessageDigest::sha256()).unwrap();
        let cert = String::from_utf8(b.build().to_pem().unwrap()).unwrap();
        (cert, pkcs1)
    }

    #[test]
    fn a_pkcs1_rsa_key_is_loaded_as_pem_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("test CA").unwrap();
        let (crt, key) = rsa_identity(&ca, "agent1");
        assert!(key.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{key}");
        write(&dir.path().join("root.crt"), &ca.cert_pem, 0o644);
        write(&dir.path().join("agent1.crt"), &crt, 0o644);
        write(&dir.path().join("agent1.key"), &key, 0o600);
        context(&settings(dir.path(), SslMode::VerifyFull)).unwrap();
        check_identity(
            &dir.path().join("agent1.crt"),
            &dir.path().join("agent1.key"),
        )
        .unwrap();
        // The key's mode is still checked.
        std::fs::set_permissions(
            dir.path().join("agent1.key"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = check_identity(
            &dir.path().join("agent1.crt"),
            &dir.path().join("agent1.key"),
        )
        .expect_err("a key readable by the group is refused");
        assert!(matches!(err, Error::KeyPermissions { .. }), "{err}");
        // Another key for the certificate is named.
        let (_, other) = rsa_identity(&ca, "agent1");
        write(&dir.path().join("agent1.key"), &other, 0o600);
        let err = check_identity(
            &dir.path().join("agent1.crt"),
            &dir.path().join("agent1.key"),
        )
        .expect_err("a key of another certificate is refused")
        .to_string();
        assert!(err.contains("agent1.key"), "{err}");
    }

    #[test]
    fn modes_that_verify_nothing_read_no_root_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), SslMode::Prefer);
        s.client_cert = None;
        // root.crt does not exist: prefer and allow never look at it.
        context(&s).unwrap();
        s.sslmode = SslMode::VerifyCa;
        let err = context(&s).err().expect("verify-ca needs its root");
        assert!(
            matches!(
                err,
                Error::ReadFile {
                    what: "root certificate",
                    ..
                }
            ),
            "{err}"
        );
        s.root_cert = None;
        let err = context(&s).err().expect("verify-ca needs a root");
        assert!(matches!(err, Error::NoRootCert { .. }), "{err}");
    }
}
