//! The replication link's transport: mutual TLS (rustls) or, when the
//! operator says so, plain TCP.
//!
//! Roles are X.509 extended key usages: a backup (the TLS server) holds a
//! certificate for `serverAuth` naming the address the primary dials, a
//! primary (the TLS client) one for `clientAuth`; both are issued by the
//! same CA (`remora certs`). A peer without a certificate from that CA, or
//! with the other role's certificate, fails the handshake: nothing of the
//! protocol (no Hello, no state) is exchanged before it completes.
//!
//! The protocol's threads read and write the connection concurrently (a
//! reader thread, writers sharing a [`crate::beacon::Link`]), so a TLS
//! connection is split: the socket is duplicated, the rustls state sits
//! behind a mutex, and the reader holds it only to decrypt what it read.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

/// Errors of the TLS setup and handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// `--tls-cert`, `--tls-key`, `--tls-ca`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Loaded TLS settings for both roles.
#[derive(Clone)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |why: String| TlsError::File {
        path: path.to_path_buf(),
        why,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file("no certificate in the file".into()));
    }
    Ok(certs)
}

impl Tls {
    /// Loads this node's certificate chain and key and the CA.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
            path: files.key.clone(),
            why: format!("cannot read the private key: {e}"),
        })?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(&files.ca)? {
            roots.add(c).map_err(|e| TlsError::File {
                path: files.ca.clone(),
                why: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(cfg)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// The reading half of a replication connection.
pub struct SecureRead {
    tcp: TcpStream,
    tls: Option<Arc<Mutex<Connection>>>,
    /// Bytes read from the socket; `start..end` not yet given to rustls.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing half of a replication connection.
pub struct SecureWrite {
    tcp: TcpStream,
    tls: Option<Arc<Mutex<Connection>>>,
}

/// Plain TCP (`--insecure`).
pub fn plain(tcp: TcpStream) -> io::Result<(SecureRead, SecureWrite)> {
    let w = tcp.try_clone()?;
    Ok((
        SecureRead {
            tcp,
            tls: None,
            raw: Vec::new(),
            start: 0,
            end: 0,
        },
        SecureWrite { tcp: w, tls: None },
    ))
}

fn handshake(
    mut tcp: TcpStream,
    mut conn: Connection,
    peer: &str,
    timeout: Duration,
) -> Result<(SecureRead, SecureWrite), TlsError> {
    let fail = |why: String| TlsError::Handshake {
        peer: peer.to_string(),
        why,
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| fail(e.to_string()))?;
    }
    // A client's last handshake flight may still be buffered.
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(|e| fail(e.to_string()))?;
    }
    let _ = tcp.set_write_timeout(None);
    let w = tcp.try_clone().map_err(|e| fail(e.to_string()))?;
    let shared = Arc::new(Mutex::new(conn));
    Ok((
        SecureRead {
            tcp,
            tls: Some(shared.clone()),
            raw: vec![0; 64 << 10],
            start: 0,
            end: 0,
        },
        SecureWrite {
            tcp: w,
            tls: Some(shared),
        },
    ))
}

/// The primary's side: verifies the backup's certificate (CA, serverAuth,
/// the address dialled) and presents its own.
pub fn connect(
    tcp: TcpStream,
    tls: &Tls,
    backup: IpAddr,
    timeout: Duration,
) -> Result<(SecureRead, SecureWrite), TlsError> {
    let peer = backup.to_string();
    let conn = ClientConnection::new(tls.client.clone(), ServerName::IpAddress(backup.into())).map_err(|e| {
        TlsError::Handshake {
            peer: peer.clone(),
            why: e.to_string(),
        }
    })?;
    handshake(tcp, Connection::Client(conn), &peer, timeout)
}

/// The backup's side: requires a primary certificate (CA, clientAuth).
pub fn accept(tcp: TcpStream, tls: &Tls, peer: &str, timeout: Duration) -> Result<(SecureRead, SecureWrite), TlsError> {
    let conn = ServerConnection::new(tls.server.clone()).map_err(|e| TlsError::Handshake {
        peer: peer.to_string(),
        why: e.to_string(),
    })?;
    handshake(tcp, Connection::Server(conn), peer, timeout)
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SecureRead {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }
}

impl Read for SecureRead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.tcp.read(out);
        };
        loop {
            let mut c = lock(tls);
            match c.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A peer gone without close_notify: end of stream.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.start < self.end {
                // rustls takes records in bounded amounts: feed what it
                // takes, keep the rest for the next turn.
                let mut rest = &self.raw[self.start..self.end];
                let before = rest.len();
                c.read_tls(&mut rest)?;
                self.start += before - rest.len();
                if let Err(e) = c.process_new_packets() {
                    // Tell the peer (an alert), then fail.
                    let _ = c.write_tls(&mut &self.tcp);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
                }
                // Key updates and the like.
                while c.wants_write() {
                    c.write_tls(&mut &self.tcp)?;
                }
                continue;
            }
            drop(c);
            // Nothing decrypted and nothing pending: more from the socket
            // (its read timeout applies; the lock is not held).
            let n = self.tcp.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

impl SecureWrite {
    /// Ends this side's stream (a TLS close_notify, then a FIN); the peer's
    /// side stays open.
    pub fn shutdown_write(&self) {
        if let Some(tls) = &self.tls {
            let mut c = lock(tls);
            c.send_close_notify();
            let _ = c.write_tls(&mut &self.tcp);
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }

    /// The socket underneath (to drain what the peer still sends; under
    /// TLS those are records, dropped unread).
    pub fn raw(&self) -> &TcpStream {
        &self.tcp
    }

    /// Closes the connection both ways (a TLS close_notify first).
    pub fn shutdown(&self) {
        if let Some(tls) = &self.tls {
            let mut c = lock(tls);
            c.send_close_notify();
            let _ = c.write_tls(&mut &self.tcp);
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

impl Write for SecureWrite {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.write_all(b)?;
        Ok(b.len())
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return self.tcp.write_all(b);
        };
        // Encrypt as much as rustls buffers at a time, so the lock (which
        // the reader needs to decrypt acknowledgements) is never held for
        // a whole checkpoint.
        let mut rest = b;
        while !rest.is_empty() {
            let mut c = lock(tls);
            // rustls takes what fits its send buffer.
            let n = c.writer().write(rest)?;
            rest = &rest[n..];
            while c.wants_write() {
                c.write_tls(&mut &self.tcp)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `remora certs init`: a CA for one cluster (ca.pem, ca.key in `dir`).
pub fn make_ca(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let g = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().map_err(g)?;
    let cert = params.self_signed(&key).map_err(g)?;
    let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
    write_new(&c, cert.pem().as_bytes(), 0o644)?;
    write_new(&k, key.serialize_pem().as_bytes(), 0o600)?;
    Ok((c, k))
}

/// Which end of the replication link a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// `remora certs issue`: NAME.pem and NAME.key in `dir`, signed by the CA
/// there, for `role`, naming `sans` (IP addresses or DNS names: a
/// backup's must include the address primaries dial).
pub fn issue(dir: &Path, name: &str, role: Role, sans: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
    let g = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| TlsError::File {
            why: format!("{e} (run 'remora certs init' first)"),
            path: p,
        })
    };
    let ca_pem = read(dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(dir.join("ca.key"))?).map_err(g)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(g)?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(g)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Primary => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Backup => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    let key = KeyPair::generate().map_err(g)?;
    let cert = params.signed_by(&key, &issuer).map_err(g)?;
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    write_new(&c, cert.pem().as_bytes(), 0o644)?;
    write_new(&k, key.serialize_pem().as_bytes(), 0o600)?;
    Ok((c, k))
}

/// Writes a file that must not exist yet (never overwrite a key).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            why: if e.kind() == io::ErrorKind::AlreadyExists {
                "already exists (remove it first: remora never overwrites keys)".into()
            } else {
                e.to_string()
            },
        })?;
    f.write_all(data).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn files(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    type Ends = Result<(SecureRead, SecureWrite), TlsError>;

    /// A backup (server) and a primary (client) on loopback: returns the
    /// primary's and the backup's results.
    fn pair(client: &Tls, server: &Tls) -> (Ends, Ends) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = server.clone();
        let t = std::thread::spawn(move || {
            let (s, peer) = l.accept().unwrap();
            accept(s, &server, &peer.to_string(), Duration::from_secs(5))
        });
        let c = connect(
            TcpStream::connect(addr).unwrap(),
            client,
            addr.ip(),
            Duration::from_secs(5),
        );
        let s = t.join().unwrap();
        (c, s)
    }

    #[test]
    fn mutual_tls_carries_bytes_both_ways_and_refuses_strangers_and_wrong_roles() {
        let dir = std::env::temp_dir().join(format!("remora-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_ca(&dir, "test ca").unwrap();
        issue(&dir, "backup", Role::Backup, &["127.0.0.1".into()]).unwrap();
        issue(&dir, "primary", Role::Primary, &["primary".into()]).unwrap();
        assert!(
            issue(&dir, "primary", Role::Primary, &[]).is_err(),
            "never overwrites a key"
        );
        let b = Tls::load(&files(&dir, "backup")).unwrap();
        let p = Tls::load(&files(&dir, "primary")).unwrap();

        let (c, s) = pair(&p, &b);
        let ((mut cr, mut cw), (mut sr, mut sw)) = (c.unwrap(), s.unwrap());
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let expect = big.clone();
        let w = std::thread::spawn(move || {
            cw.write_all(&big).unwrap();
            cw
        });
        let mut got = vec![0u8; expect.len()];
        sr.read_exact(&mut got).unwrap();
        assert!(got == expect);
        sw.write_all(b"ack").unwrap();
        let mut a = [0u8; 3];
        cr.read_exact(&mut a).unwrap();
        assert_eq!(&a, b"ack");
        let cw = w.join().unwrap();
        cw.shutdown();
        assert_eq!(sr.read(&mut a).unwrap(), 0, "close_notify ends the stream");

        // Wrong roles: a backup certificate used by a primary, and the
        // other way round, fail the handshake.
        let (c, s) = pair(&b, &b);
        assert!(c.is_err() || s.is_err(), "a backup certificate cannot act as a primary");
        let (c, s) = pair(&p, &p);
        assert!(c.is_err() && s.is_err(), "a primary certificate cannot act as a backup");

        // A stranger: a certificate from another CA.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        make_ca(&other, "other ca").unwrap();
        issue(&other, "primary", Role::Primary, &["x".into()]).unwrap();
        let mut f = files(&other, "primary");
        f.ca = dir.join("ca.pem");
        let stranger = Tls::load(&f).unwrap();
        let (c, s) = pair(&stranger, &b);
        assert!(s.is_err(), "the backup refuses a primary from another CA");
        let _ = c;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_files_are_named() {
        let e = Tls::load(&TlsFiles {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/c.key".into(),
            ca: "/nonexistent/ca.pem".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }
}
