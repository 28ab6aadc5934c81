//! Sees the server's authentication request before any password leaves.
//!
//! tokio-postgres answers an AuthenticationCleartextPassword request with the password on its
//! own. The agent must not do that unless it verified the server's certificate, so every session
//! runs over [`Guarded`] streams that tokio-postgres reads and writes through: one on the socket
//! (it watches the conversation when no TLS was agreed) and one on the TLS stream (it watches
//! the decrypted conversation). They follow the server's messages until authentication is over;
//! once the server asked for a cleartext password on a channel that is not verified, nothing
//! more is written, so the password message never leaves. The same [`Watch`] records whether the
//! server refused TLS and why a handshake failed, for one-line errors.
//!
//! Written by hand because tokio-postgres has no hook between reading the request and answering
//! it; the parser only needs each message's type, length and authentication code.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use super::ConnectSettings;

/// What the guards of one connection attempt saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The server answered the request for TLS with "N".
    pub tls_refused: bool,
    /// Why the TLS handshake failed, if it did.
    pub handshake_error: Option<String>,
    /// The server asked for the password in clear text, and it was not sent.
    pub cleartext_refused: bool,
    /// The server asked for a password of any kind (cleartext, md5, SCRAM).
    pub password_requested: bool,
    /// What the failed handshake says about certificates, if anything.
    pub tls_failure: Option<TlsFailure>,
    /// The TLS handshake completed (this side's view: under TLS 1.3 the server may still
    /// refuse this side's certificate afterwards).
    pub tls_established: bool,
}

/// A TLS failure over a certificate, told by OpenSSL's error codes. Fixed by replacing a file
/// (or the clock), never by trying again at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// This side could not verify the server's certificate (another CA, expired, another name).
    ServerNotVerified,
    /// The server refused this side's certificate as expired.
    ClientExpired,
    /// The server refused this side's certificate otherwise (a CA it does not trust, revoked,
    /// unknown, missing).
    ClientRefused,
}

/// OpenSSL's reason codes for these failures (include/openssl/sslerr.h, library SSL).
const ERR_LIB_SSL: i32 = 20;
const SSL_R_CERTIFICATE_VERIFY_FAILED: i32 = 134;
const SSL_R_SSLV3_ALERT_BAD_CERTIFICATE: i32 = 1042;
const SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: i32 = 1043;
const SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED: i32 = 1044;
const SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED: i32 = 1045;
const SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN: i32 = 1046;
const SSL_R_TLSV1_ALERT_UNKNOWN_CA: i32 = 1048;
const SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED: i32 = 1116;

fn classify(stack: &openssl::error::ErrorStack) -> Option<TlsFailure> {
    stack
        .errors()
        .iter()
        .filter(|e| e.library_code() == ERR_LIB_SSL)
        .find_map(|e| match e.reason_code() {
            SSL_R_CERTIFICATE_VERIFY_FAILED => Some(TlsFailure::ServerNotVerified),
            SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED => Some(TlsFailure::ClientExpired),
            SSL_R_SSLV3_ALERT_BAD_CERTIFICATE
            | SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE
            | SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED
            | SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN
            | SSL_R_TLSV1_ALERT_UNKNOWN_CA
            | SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED => Some(TlsFailure::ClientRefused),
            _ => None,
        })
}

/// The certificate problem in an error's chain, if any: from a failed handshake, or (TLS 1.3,
/// where the server judges the client's certificate after the client finished its handshake)
/// from the first read after it.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(stack) = err.downcast_ref::<openssl::error::ErrorStack>() {
            if let Some(f) = classify(stack) {
                return Some(f);
            }
        }
        if let Some(f) = err
            .downcast_ref::<openssl::ssl::Error>()
            .and_then(|e| e.ssl_error())
            .and_then(classify)
        {
            return Some(f);
        }
        if let Some(f) = err
            .downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .and_then(|inner| tls_failure(inner))
        {
            return Some(f);
        }
        cur = err.source();
    }
    None
}

/// Shared between the guards of one connection attempt and the code that reports its outcome.
#[derive(Debug, Clone, Default)]
pub struct Watch(Arc<Mutex<Seen>>);

impl Watch {
    fn update(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn seen(&self) -> Seen {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the server's messages said about authentication so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthEvent {
    /// AuthenticationCleartextPassword: nothing more is watched.
    CleartextRequested,
    /// AuthenticationMD5Password or AuthenticationSASL.
    PasswordRequested,
    /// AuthenticationOk: nothing more to watch.
    Finished,
}

/// Follows the backend's message stream (type byte, 4-byte length including itself, body) fed
/// in arbitrary pieces, and reports authentication requests.
#[derive(Debug, Default, Clone)]
pub struct AuthParser {
    header: [u8; 9],
    have: usize,
    skip: usize,
    done: bool,
}

impl AuthParser {
    fn length(&self) -> usize {
        u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]) as usize
    }

    /// Header bytes needed: the type and length, and for an authentication message whose body
    /// holds one, its 4-byte code too.
    fn wanted(&self) -> usize {
        if self.have >= 5 && self.header[0] == b'R' && self.length() >= 8 {
            9
        } else {
            5
        }
    }

    /// Feeds bytes read from the server; returns what they said about authentication: the end
    /// of it or a cleartext request (after which nothing more is looked at), else a request for
    /// another kind of password. A malformed header, which tokio-postgres reports itself, ends
    /// the watch too.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<AuthEvent> {
        let mut seen = None;
        while !data.is_empty() && !self.done {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = self.wanted();
            let n = (want - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < self.wanted() {
                continue;
            }
            let len = self.length();
            if len < 4 {
                self.done = true;
                return seen;
            }
            let body_read = self.have - 5;
            self.skip = len - 4 - body_read;
            self.have = 0;
            if self.header[0] == b'R' && body_read == 4 {
                let code = i32::from_be_bytes([
                    self.header[5],
                    self.header[6],
                    self.header[7],
                    self.header[8],
                ]);
                match code {
                    0 | 3 => {
                        self.done = true;
                        return Some(if code == 0 {
                            AuthEvent::Finished
                        } else {
                            AuthEvent::CleartextRequested
                        });
                    }
                    5 | 10 => seen = Some(AuthEvent::PasswordRequested),
                    _ => {}
                }
            }
        }
        seen
    }
}

/// The SSLRequest message: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[derive(Debug)]
enum Phase {
    /// On the socket, before the first message: an SSLRequest or the startup message.
    Start,
    /// On the socket after an SSLRequest: the next byte is the server's answer.
    SslAnswer,
    /// TLS was agreed; the guard on the TLS stream watches.
    Opaque,
    /// Reading the server's messages.
    Watching,
    /// Authentication is over (or nothing needs watching).
    Done,
}

/// A stream tokio-postgres reads and writes through (see the module documentation).
pub struct Guarded<S> {
    inner: S,
    phase: Phase,
    parser: AuthParser,
    /// Refuse a cleartext password request (the channel is not verified).
    guard_cleartext: bool,
    blocked: bool,
    watch: Watch,
}

impl<S> Guarded<S> {
    /// The guard on the socket itself.
    pub fn socket(inner: S, watch: Watch, guard_cleartext: bool) -> Guarded<S> {
        Guarded {
            inner,
            phase: Phase::Start,
            parser: AuthParser::default(),
            guard_cleartext,
            blocked: false,
            watch,
        }
    }

    /// The guard on a TLS stream, which carries the conversation from its first message.
    fn tls(inner: S, watch: Watch, guard_cleartext: bool) -> Guarded<S> {
        Guarded {
            inner,
            phase: Phase::Watching,
            parser: AuthParser::default(),
            guard_cleartext,
            blocked: false,
            watch,
        }
    }

    fn watch_messages(&mut self, data: &[u8]) {
        match self.parser.feed(data) {
            Some(AuthEvent::CleartextRequested) => {
                self.watch.update(|s| s.password_requested = true);
                if self.guard_cleartext {
                    self.blocked = true;
                    self.watch.update(|s| s.cleartext_refused = true);
                }
                self.phase = Phase::Done;
            }
            Some(AuthEvent::PasswordRequested) => {
                self.watch.update(|s| s.password_requested = true)
            }
            Some(AuthEvent::Finished) => self.phase = Phase::Done,
            None => {}
        }
    }

    fn on_read(&mut self, data: &[u8]) {
        match self.phase {
            Phase::SslAnswer => {
                let Some((&answer, rest)) = data.split_first() else {
                    return;
                };
                if answer == b'S' {
                    self.phase = Phase::Opaque;
                } else {
                    self.watch.update(|s| s.tls_refused = true);
                    self.phase = Phase::Watching;
                    if !rest.is_empty() {
                        self.on_read(rest);
                    }
                }
            }
            Phase::Watching => self.watch_messages(data),
            Phase::Start | Phase::Opaque | Phase::Done => {}
        }
    }

    fn on_write(&mut self, data: &[u8]) {
        if let Phase::Start = self.phase {
            self.phase = if data.starts_with(&SSL_REQUEST) {
                Phase::SslAnswer
            } else {
                Phase::Watching
            };
        }
    }
}

/// The error a blocked write returns; the caller reports it from the [`Watch`].
fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "cleartext password requested on an unverified connection; not sent",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            if !matches!(this.phase, Phase::Done | Phase::Opaque) {
                this.on_read(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.blocked {
            return Poll::Ready(Err(refused()));
        }
        self.on_write(data);
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Guarded<S> {
    /// SCRAM channel binding uses the TLS session's, unchanged.
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// The TLS step: OpenSSL's handshake ([`super::tls`]), its failure recorded, its stream
/// guarded.
pub struct GuardedTls {
    ssl: openssl::ssl::Ssl,
    watch: Watch,
    guard_cleartext: bool,
}

impl GuardedTls {
    pub(super) fn new(ssl: openssl::ssl::Ssl, watch: Watch, guard_cleartext: bool) -> GuardedTls {
        GuardedTls {
            ssl,
            watch,
            guard_cleartext,
        }
    }
}

impl<S> TlsConnect<S> for GuardedTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Guarded<super::tls::TlsStream<S>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Stream>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            match super::tls::handshake(self.ssl, stream).await {
                Ok(s) => {
                    self.watch.update(|s| s.tls_established = true);
                    Ok(Guarded::tls(s, self.watch, self.guard_cleartext))
                }
                Err(e) => {
                    let why = e.why.split_whitespace().collect::<Vec<_>>().join(" ");
                    self.watch.update(|s| {
                        s.handshake_error = Some(why.clone());
                        s.tls_failure = e.failure;
                    });
                    Err(io::Error::other(why))
                }
            }
        })
    }
}

/// A TCP or Unix-domain socket to the server.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Opens the socket `settings` name: the Unix socket file in a socket directory, or the
    /// host's addresses in turn, with TCP keepalives as libpq sets them.
    pub async fn open(settings: &ConnectSettings) -> io::Result<Socket> {
        if settings.is_unix_socket() {
            let path = format!("{}/.s.PGSQL.{}", settings.host, settings.port);
            return Ok(Socket::Unix(UnixStream::connect(path).await?));
        }
        let mut last = None;
        for addr in tokio::net::lookup_host((settings.host.as_str(), settings.port)).await? {
            match tcp(addr).await {
                Ok(s) => return Ok(Socket::Tcp(s)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the host name has no address")
        }))
    }
}

async fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_keepalive(true)?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend(extra);
        message(b'R', &body)
    }

    #[test]
    fn a_cleartext_request_is_seen_in_any_split() {
        let mut stream = message(b'N', b"notice body\0");
        stream.extend(auth(3, &[]));
        for split in 0..stream.len() {
            let mut p = AuthParser::default();
            let a = p.feed(&stream[..split]);
            let b = p.feed(&stream[split..]);
            assert_eq!(
                a.or(b),
                Some(AuthEvent::CleartextRequested),
                "split {split}"
            );
        }
    }

    #[test]
    fn md5_and_scram_are_followed_to_the_end() {
        let mut stream = auth(5, b"salt");
        stream.extend(auth(10, b"SCRAM-SHA-256\0\0"));
        stream.extend(auth(11, b"server-first"));
        stream.extend(auth(12, b"server-final"));
        let mut p = AuthParser::default();
        let mut events = Vec::new();
        let mut rest = &stream[..];
        // One message per read, as a client reads them.
        while !rest.is_empty() {
            let len = 1 + u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            events.push(p.feed(&rest[..len]));
            rest = &rest[len..];
        }
        assert_eq!(
            events,
            [
                Some(AuthEvent::PasswordRequested),
                Some(AuthEvent::PasswordRequested),
                None,
                None
            ]
        );
        assert_eq!(p.feed(&auth(0, &[])), Some(AuthEvent::Finished));
        // After the end nothing is looked at, however it looks.
        assert_eq!(p.feed(&auth(3, &[])), None);
    }

    #[test]
    fn a_short_authentication_message_is_not_mistaken_for_a_request() {
        // An 'R' without a code, then a cleartext request: the first is skipped whole.
        let mut stream = message(b'R', &[]);
        stream.extend(auth(3, &[]));
        let mut p = AuthParser::default();
        assert_eq!(p.feed(&stream), Some(AuthEvent::CleartextRequested));
        let mut p = AuthParser::default();
        assert_eq!(
            p.feed(&[b'R', 0, 0, 0, 2]),
            None,
            "a length below 4 ends the watch"
        );
        assert_eq!(p.feed(&auth(3, &[])), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A server's message: an authentication request with one of its codes, or another.
        fn server_message() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                (
                    prop_oneof![Just(5i32), Just(10), Just(11), Just(12), Just(7), Just(9)],
                    proptest::collection::vec(any::<u8>(), 0..20)
                )
                    .prop_map(|(code, extra)| auth(code, &extra)),
                (
                    proptest::sample::select(b"ESNKZ".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..30)
                )
                    .prop_map(|(ty, body)| message(ty, &body)),
            ]
        }

        proptest! {
            #[test]
            fn a_cleartext_request_is_seen_however_the_reads_fall(
                before in proptest::collection::vec(server_message(), 0..6),
                cuts in proptest::collection::vec(1usize..40, 0..20),
            ) {
                let mut stream: Vec<u8> = before.concat();
                stream.extend(auth(3, &[]));
                let mut p = AuthParser::default();
                let mut events = Vec::new();
                let mut rest = &stream[..];
                for c in cuts {
                    let n = c.min(rest.len());
                    events.push(p.feed(&rest[..n]));
                    rest = &rest[n..];
                }
                events.push(p.feed(rest));
                prop_assert!(events.contains(&Some(AuthEvent::CleartextRequested)));
            }

            #[test]
            fn any_bytes_are_followed_without_a_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
                let mut p = AuthParser::default();
                for chunk in data.chunks(7) {
                    let _ = p.feed(chunk);
                }
            }
        }
    }
}
