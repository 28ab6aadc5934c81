//! An impostor: a small fake PostgreSQL server that plays an attacker in the place of the PEM
//! server (the one fake the tests use). It records every byte a client sends it (decrypted when
//! it speaks TLS) so tests can assert that no password and no sample reached it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pemworker::certs::Authority;

/// What the impostor answers to the request for TLS.
#[derive(Clone)]
pub enum Tls {
    /// "N": no TLS here (the conversation goes on in plain text if the client wants).
    Refuse,
    /// TLS with this certificate and key (PEM).
    Accept { cert: String, key: String },
}

impl Tls {
    /// TLS with a certificate for 127.0.0.1 from a CA of the impostor's own.
    pub fn foreign_ca() -> Tls {
        let ca = Authority::generate("impostor CA").unwrap();
        let (cert, key) = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        Tls::Accept { cert, key }
    }
}

/// How the impostor authenticates the client once the TLS step is over.
#[derive(Clone, Copy)]
pub enum Auth {
    /// AuthenticationCleartextPassword, then AuthenticationOk whatever comes back.
    Cleartext,
    /// AuthenticationOk at once (it wants the client's queries).
    Trust,
}

pub struct Impostor {
    pub port: u16,
    received: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Impostor {
    pub fn start(tls: Tls, auth: Auth) -> Impostor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = match &tls {
            Tls::Refuse => None,
            Tls::Accept { cert, key } => Some(
                native_tls::TlsAcceptor::new(
                    native_tls::Identity::from_pkcs8(cert.as_bytes(), key.as_bytes()).unwrap(),
                )
                .unwrap(),
            ),
        };
        let (rec, halt) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (rec, acceptor) = (rec.clone(), acceptor.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, acceptor, auth, &rec);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Impostor {
            port,
            received,
            stop,
        }
    }

    /// Every byte clients sent so far (after TLS: the decrypted bytes).
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }

    /// Whether `needle` is among the bytes received.
    pub fn got(&self, needle: &[u8]) -> bool {
        self.received().windows(needle.len()).any(|w| w == needle)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A stream that records what is read from it.
struct Recording<'a, S> {
    inner: S,
    rec: &'a Mutex<Vec<u8>>,
}

impl<S: Read> Read for Recording<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.rec.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<S: Write> Write for Recording<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn serve(
    stream: TcpStream,
    acceptor: Option<native_tls::TlsAcceptor>,
    auth: Auth,
    rec: &Mutex<Vec<u8>>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut raw = Recording { inner: stream, rec };
    let mut first = [0u8; 8];
    raw.read_exact(&mut first)?;
    if first != SSL_REQUEST {
        // A client that did not ask for TLS: these bytes begin its startup message.
        return converse(&mut raw, Some(first), auth);
    }
    match acceptor {
        None => {
            raw.write_all(b"N")?;
            converse(&mut raw, None, auth)
        }
        Some(a) => {
            raw.write_all(b"S")?;
            let tls = a
                .accept(raw.inner)
                .map_err(|e| io::Error::other(e.to_string()))?;
            converse(&mut Recording { inner: tls, rec }, None, auth)
        }
    }
}

fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

fn error(code: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (f, v) in [(b'S', "ERROR"), (b'C', code), (b'M', "not today")] {
        body.push(f);
        body.extend(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

/// Reads one message (type byte, length, body).
fn read_message(s: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn converse<S: Read + Write>(s: &mut S, started: Option<[u8; 8]>, auth: Auth) -> io::Result<()> {
    // The startup message: length, then the rest.
    let mut head = [0u8; 4];
    let mut rest_of_first = Vec::new();
    match started {
        Some(b) => {
            head.copy_from_slice(&b[..4]);
            rest_of_first.extend_from_slice(&b[4..]);
        }
        None => s.read_exact(&mut head)?,
    }
    let len = u32::from_be_bytes(head) as usize;
    let mut body = vec![0u8; len.saturating_sub(4 + rest_of_first.len())];
    s.read_exact(&mut body)?;
    if let Auth::Cleartext = auth {
        s.write_all(&message(b'R', &3i32.to_be_bytes()))?;
        s.flush()?;
        read_message(s)?; // the password, if the client sends it
    }
    s.write_all(&message(b'R', &0i32.to_be_bytes()))?;
    s.write_all(&message(b'S', b"server_version\x0015.0\x00"))?;
    s.write_all(&message(b'K', &[0, 0, 0, 42, 0, 0, 0, 42]))?;
    s.write_all(&message(b'Z', b"I"))?;
    s.flush()?;
    // Whatever the client asks, it is told no; what it sent is recorded.
    loop {
        let (ty, _) = read_message(s)?;
        match ty {
            b'X' => return Ok(()),
            b'Q' | b'S' => {
                s.write_all(&error("08006"))?;
                s.write_all(&message(b'Z', b"I"))?;
                s.flush()?;
            }
            _ => {}
        }
    }
}
