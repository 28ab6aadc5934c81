//! A hostile server: a TLS proxy in front of the real pgBouncer that the agent trusts (its
//! certificate comes from the PEM server's CA) and that mangles the replies to the agent's
//! queries: no rows, a column short, or every column of another type. Everything else passes
//! through unchanged, so the agent's flows run for real up to the mangled reply.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a reply is mangled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mangle {
    /// The rows are dropped (the row description stays).
    Empty,
    /// The last column is dropped from the description and from every row.
    Short,
    /// Every column is described as another type (text as boolean, anything else as text).
    WrongType,
}

pub const ALL: [Mangle; 3] = [Mangle::Empty, Mangle::Short, Mangle::WrongType];

/// Which replies are mangled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// None: the proxy is transparent.
    Off,
    /// Every reply with rows.
    Every(Mangle),
    /// The reply to the `n`-th query (from 0) of each connection.
    Nth(usize, Mangle),
}

#[derive(Default)]
struct State {
    /// Query texts seen, in order, over all connections.
    queries: Vec<String>,
    /// How many replies were mangled.
    mangled: usize,
}

pub struct Hostile {
    pub port: u16,
    rule: Arc<Mutex<Rule>>,
    state: Arc<Mutex<State>>,
}

/// Where the proxy connects to, and as whom.
#[derive(Clone)]
pub struct Upstream {
    pub port: u16,
    /// The client certificate and key (PEM) the proxy presents, for certificate logins.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Hostile {
    /// A proxy on a free port, presenting `cert`/`key` (PEM) to its clients.
    pub async fn start(cert: &str, key: &str, upstream: Upstream) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let identity = native_tls::Identity::from_pkcs8(cert.as_bytes(), key.as_bytes()).unwrap();
        let acceptor: tokio_native_tls::TlsAcceptor =
            native_tls::TlsAcceptor::new(identity).unwrap().into();
        let rule = Arc::new(Mutex::new(Rule::Off));
        let state = Arc::new(Mutex::new(State::default()));
        let (r, s) = (rule.clone(), state.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream, r, s) =
                    (acceptor.clone(), upstream.clone(), r.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = serve(client, acceptor, upstream, r, s).await;
                });
            }
        });
        Hostile { port, rule, state }
    }

    pub fn set(&self, rule: Rule) {
        *self.rule.lock().unwrap() = rule;
    }

    /// Queries seen so far whose text contains `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.queries.iter().filter(|q| q.contains(pattern)).count()
    }

    pub fn mangled(&self) -> usize {
        self.state.lock().unwrap().mangled
    }
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

async fn serve(
    mut client: TcpStream,
    acceptor: tokio_native_tls::TlsAcceptor,
    upstream: Upstream,
    rule: Arc<Mutex<Rule>>,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let io = |e: native_tls::Error| std::io::Error::other(e.to_string());
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await?;
    if first != SSL_REQUEST {
        return Ok(());
    }
    client.write_all(b"S").await?;
    let client = acceptor.accept(client).await.map_err(io)?;

    let mut server = TcpStream::connect(("127.0.0.1", upstream.port)).await?;
    server.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    server.read_exact(&mut answer).await?;
    let mut b = native_tls::TlsConnector::builder();
    b.danger_accept_invalid_certs(true);
    if let Some((cert, key)) = &upstream.identity {
        b.identity(native_tls::Identity::from_pkcs8(cert, key).map_err(io)?);
    }
    let connector: tokio_native_tls::TlsConnector = b.build().map_err(io)?.into();
    let server = connector.connect("127.0.0.1", server).await.map_err(io)?;

    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    // The startup message has no type byte.
    let mut len = [0u8; 4];
    cr.read_exact(&mut len).await?;
    let mut startup = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    cr.read_exact(&mut startup).await?;
    sw.write_all(&len).await?;
    sw.write_all(&startup).await?;

    // Each query's text, waiting for its reply (a Sync or a simple Query ends a request).
    let pending: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let p = pending.clone();
    let st = state.clone();
    let to_server = async move {
        let mut text = String::new();
        loop {
            let (ty, body) = read_message(&mut cr).await?;
            match ty {
                b'P' => {
                    // Parse: statement name, then the query text.
                    let name_end = body.iter().position(|&c| c == 0).unwrap_or(0);
                    let rest = &body[name_end + 1..];
                    let q_end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                    text = String::from_utf8_lossy(&rest[..q_end]).into_owned();
                }
                b'Q' => {
                    let q = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body))
                        .into_owned();
                    p.lock().unwrap().push_back(q.clone());
                    st.lock().unwrap().queries.push(q);
                }
                b'S' => {
                    p.lock().unwrap().push_back(std::mem::take(&mut text));
                    let q = p.lock().unwrap().back().cloned().unwrap_or_default();
                    st.lock().unwrap().queries.push(q);
                }
                _ => {}
            }
            sw.write_all(&message(ty, &body)).await?;
            if ty == b'X' {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let to_client = async move {
        let mut authenticated = false;
        let mut index = 0usize;
        let mut reply: Vec<(u8, Vec<u8>)> = Vec::new();
        loop {
            let (ty, body) = read_message(&mut sr).await?;
            if !authenticated {
                authenticated = ty == b'Z';
                cw.write_all(&message(ty, &body)).await?;
                continue;
            }
            reply.push((ty, body));
            if ty != b'Z' {
                continue;
            }
            let _query = pending.lock().unwrap().pop_front();
            let how = match *rule.lock().unwrap() {
                Rule::Off => None,
                Rule::Every(m) => Some(m),
                Rule::Nth(n, m) => (n == index).then_some(m),
            };
            index += 1;
            if let Some(m) = how {
                if mangle(&mut reply, m) {
                    state.lock().unwrap().mangled += 1;
                }
            }
            for (t, b) in reply.drain(..) {
                cw.write_all(&message(t, &b)).await?;
            }
        }
    };
    tokio::select! {
        r = to_server => r,
        r = to_client => r,
    }
}

/// Mangles the messages of one reply; true when there was something to mangle.
fn mangle(reply: &mut Vec<(u8, Vec<u8>)>, how: Mangle) -> bool {
    if !reply.iter().any(|(t, _)| *t == b'T') {
        return false;
    }
    match how {
        Mangle::Empty => reply.retain(|(t, _)| *t != b'D'),
        Mangle::Short => {
            for (t, body) in reply.iter_mut() {
                match *t {
                    b'T' => *body = drop_last_field(body),
                    b'D' => *body = drop_last_value(body),
                    _ => {}
                }
            }
        }
        Mangle::WrongType => {
            for (t, body) in reply.iter_mut() {
                if *t == b'T' {
                    retype(body);
                }
            }
        }
    }
    true
}

/// Offsets of each field description in a RowDescription body: (start, end).
fn fields(body: &[u8]) -> Vec<(usize, usize)> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let name_end = at + body[at..].iter().position(|&c| c == 0).unwrap();
        let end = name_end + 1 + 18;
        out.push((at, end));
        at = end;
    }
    out
}

fn drop_last_field(body: &[u8]) -> Vec<u8> {
    let f = fields(body);
    let Some(&(start, _)) = f.last() else {
        return body.to_vec();
    };
    let mut out = ((f.len() - 1) as i16).to_be_bytes().to_vec();
    out.extend(&body[2..start]);
    out
}

fn drop_last_value(body: &[u8]) -> Vec<u8> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    if n == 0 {
        return body.to_vec();
    }
    let mut at = 2;
    for _ in 0..n - 1 {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4 + len.max(0) as usize;
    }
    let mut out = ((n - 1) as i16).to_be_bytes().to_vec();
    out.extend(&body[2..at]);
    out
}

/// Text (25) becomes boolean (16); anything else becomes text.
fn retype(body: &mut [u8]) {
    for (_, end) in fields(body) {
        let oid_at = end - 18 + 6;
        let oid = u32::from_be_bytes(body[oid_at..oid_at + 4].try_into().unwrap());
        let new: u32 = if oid == 25 { 16 } else { 25 };
        body[oid_at..oid_at + 4].copy_from_slice(&new.to_be_bytes());
    }
}
