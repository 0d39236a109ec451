//! Migrations over `tcp:` in mutual TLS, as the original's `tls_dir`: the sender checks the
//! receiver's certificate against `ca-cert.pem` and the host of the URL, and shows
//! `client-cert.pem` (key `client-key.pem`); the receiver shows `server-cert.pem` (key
//! `server-key.pem`) and takes only clients whose certificate `ca-cert.pem` issued. TLS 1.3,
//! rustls with ring, as the original's build. The handshake is made before the stream is
//! handed back, so that a refused peer is an error of the connection, not of a later request.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{ConnectionCommon, StreamOwned};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// A migration connection in TLS.
pub enum TlsStream {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let path = dir.join(name);
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, String> {
    let path = dir.join(name);
    PrivateKeyDer::from_pem_file(&path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(dir: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", dir.join(CA_CERT).display()))?;
    }
    Ok(roots)
}

/// Drives `conn`'s handshake to its end over `sock`.
fn handshake<D>(conn: &mut ConnectionCommon<D>, sock: &mut TcpStream) -> Result<(), String> {
    while conn.is_handshaking() {
        let (rd, wr) = conn
            .complete_io(sock)
            .map_err(|e| format!("TLS handshake: {e}"))?;
        if rd == 0 && wr == 0 {
            return Err("TLS handshake: the peer closed the connection".into());
        }
    }
    Ok(())
}

impl TlsStream {
    /// The sender's side, to `host` (the URL's, which the receiver's certificate must name).
    pub fn client(mut sock: TcpStream, dir: &Path, host: &str) -> Result<Self, String> {
        // TLS 1.3 (rustls without its tls12 feature) with ring, its only provider here.
        let config = ClientConfig::builder()
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
            .map_err(|e| format!("the client certificate and key: {e}"))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: not a host name for TLS: {e}"))?;
        let mut conn =
            ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS: {e}"))?;
        handshake(&mut conn, &mut sock)?;
        Ok(TlsStream::Client(StreamOwned::new(conn, sock)))
    }

    /// The receiver's configuration from `dir`: its certificate, and only clients
    /// `ca-cert.pem` vouches for. Read once, where the files may be opened (the threads that
    /// take further connections may not).
    pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, String> {
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots(dir)?))
            .build()
            .map_err(|e| format!("{}: {e}", dir.join(CA_CERT).display()))?;
        let config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
            .map_err(|e| format!("the server certificate and key: {e}"))?;
        Ok(Arc::new(config))
    }

    /// The receiver's side of a connection.
    pub fn server(mut sock: TcpStream, config: &Arc<ServerConfig>) -> Result<Self, String> {
        let mut conn =
            ServerConnection::new(Arc::clone(config)).map_err(|e| format!("TLS: {e}"))?;
        handshake(&mut conn, &mut sock)?;
        Ok(TlsStream::Server(StreamOwned::new(conn, sock)))
    }

    /// The TCP connection under it (timeouts, buffers; never read or written directly).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            TlsStream::Client(s) => &s.sock,
            TlsStream::Server(s) => &s.sock,
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TlsStream::Client(s) => s.read(buf),
            TlsStream::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Each write goes out at once: the protocol waits for answers after it.
        let n = match self {
            TlsStream::Client(s) => s.write(buf)?,
            TlsStream::Server(s) => s.write(buf)?,
        };
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            TlsStream::Client(s) => s.flush(),
            TlsStream::Server(s) => s.flush(),
        }
    }
}
