//! Upstream TLS for the PostgreSQL proxy: the gate's own connection to the real server.
//!
//! This module owns the client side of PostgreSQL's in-band TLS negotiation towards the
//! upstream server: the per-target TLS mode (`disable`, `require`, `verify-full`), building a
//! rustls client configuration once at daemon start (reading the operator's `ca_file`, or the
//! system roots), the 8-byte `SSLRequest` exchange, the TLS handshake, and the resulting
//! plain-or-TLS stream the proxy speaks the startup message on. It knows nothing about the
//! agent side of the proxy, authentication, or policy. Only the ring crypto provider is used.
//!
//! Security rules kept here: after sending `SSLRequest` exactly ONE byte is read straight from
//! the socket (no buffering), so bytes a man-in-the-middle injects after the server's `'S'`
//! can only ever reach the TLS record layer, never the plaintext protocol (CVE-2021-23222);
//! an `'E'` reply is reported without reading the untrusted error text (CVE-2024-10977).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// PostgreSQL `SSLRequest`: length 8, request code 80877103 (1234 << 16 | 5679).
pub const SSL_REQUEST: [u8; 8] = [0x00, 0x00, 0x00, 0x08, 0x04, 0xD2, 0x16, 0x2F];

/// Where the system trust store is looked for when `verify-full` has no `ca_file`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the gate secures its connection to the upstream PostgreSQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP; no `SSLRequest` is sent.
    #[default]
    Disable,
    /// TLS is mandatory, but the server certificate is not verified (libpq `sslmode=require`
    /// without a root certificate). Handshake signatures are still checked.
    Require,
    /// TLS is mandatory, the certificate must chain to the configured CA (or the system roots)
    /// and match the server name (DNS name or IP address).
    VerifyFull,
}

impl TlsMode {
    /// The configuration spelling (`disable`, `require`, `verify-full`).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors building the TLS configuration or negotiating TLS with the upstream server.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no usable certificate.
    #[error("CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    /// `verify-full` without `ca_file`, and no usable system trust store.
    #[error(
        "verify-full needs a ca_file: no usable system root certificates at {SYSTEM_CA_BUNDLE}"
    )]
    NoRootCertificates,
    /// The server answered `'N'` to `SSLRequest`.
    #[error("upstream server does not support TLS (it answered 'N' to SSLRequest)")]
    ServerRefusedTls,
    /// The server answered something other than `'S'` or `'N'` (`'E'`: an error response,
    /// deliberately not read).
    #[error("unexpected reply to SSLRequest from upstream server: byte 0x{0:02x}")]
    UnexpectedResponse(u8),
    /// The server's certificate was rejected (unknown issuer, wrong name, expired...).
    #[error("upstream server certificate rejected: {0}")]
    Certificate(rustls::CertificateError),
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake with upstream server failed: {0}")]
    Handshake(io::Error),
    /// The configured server name is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    /// The rustls configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    /// I/O error during the `SSLRequest` exchange.
    #[error("I/O error negotiating TLS with upstream server: {0}")]
    Io(io::Error),
}

/// Built once per target at daemon start (reads ca_file), cheap to clone.
#[derive(Clone)]
pub struct UpstreamTls {
    mode: TlsMode,
    /// `None` exactly when `mode == Disable`.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .field("server_name", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

impl UpstreamTls {
    /// Builds the client configuration for one target.
    ///
    /// `ca_file` (PEM, one or more certificates) is used by `verify-full`; without it the system
    /// bundle at [`SYSTEM_CA_BUNDLE`] is used. `require` and `disable` ignore `ca_file`.
    /// `server_name` (DNS name or IP literal) is what `verify-full` checks the certificate
    /// against, and is sent as SNI when it is a DNS name; `disable` ignores it.
    pub fn new(
        mode: TlsMode,
        ca_file: Option<&Path>,
        server_name: &str,
    ) -> Result<UpstreamTls, TlsError> {
        if mode == TlsMode::Disable {
            return Ok(UpstreamTls { mode, tls: None });
        }
        let name = parse_server_name(server_name)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let config = match mode {
            TlsMode::VerifyFull => {
                let roots = match ca_file {
                    Some(path) => load_ca_file(path)?,
                    None => load_system_roots()?,
                };
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            TlsMode::Require | TlsMode::Disable => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { algorithms }))
                .with_no_client_auth(),
        };
        Ok(UpstreamTls {
            mode,
            tls: Some((Arc::new(config), name)),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Performs PostgreSQL's SSLRequest negotiation on a fresh TCP connection (send the 8-byte
    /// SSLRequest, read exactly ONE byte: 'S' -> TLS handshake, 'N' -> error for require/verify-full;
    /// anything else -> error), then returns the stream to speak the startup on.
    /// `Disable` returns the plain stream without sending anything.
    ///
    /// No timeout is applied here: wrap the call in the proxy's connect timeout.
    pub async fn wrap(&self, mut tcp: TcpStream) -> Result<UpstreamStream, TlsError> {
        let Some((config, name)) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        tcp.write_all(&SSL_REQUEST).await.map_err(TlsError::Io)?;
        tcp.flush().await.map_err(TlsError::Io)?;
        // Exactly one byte, read directly from the unbuffered socket: whatever follows 'S'
        // belongs to the TLS layer and must not be seen as plaintext.
        let reply = tcp.read_u8().await.map_err(TlsError::Io)?;
        match reply {
            b'S' => {}
            b'N' => return Err(TlsError::ServerRefusedTls),
            other => return Err(TlsError::UnexpectedResponse(other)),
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        match connector.connect(name.clone(), tcp).await {
            Ok(stream) => Ok(UpstreamStream::Tls(Box::new(stream))),
            Err(err) => Err(classify_handshake_error(err)),
        }
    }
}

/// Plain or TLS; implements tokio AsyncRead + AsyncWrite + Unpin + Send.
#[derive(Debug)]
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }

    /// The underlying TCP socket (for peer/local addresses, socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn parse_server_name(server_name: &str) -> Result<ServerName<'static>, TlsError> {
    // Accept bracketed IPv6 literals as written in URLs/host:port configs.
    let bare = server_name
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(server_name);
    if bare.is_empty() {
        return Err(TlsError::InvalidServerName(server_name.to_owned()));
    }
    ServerName::try_from(bare.to_owned())
        .map_err(|_| TlsError::InvalidServerName(server_name.to_owned()))
}

/// Reads the operator's CA file strictly: every certificate in it must parse as a trust anchor.
fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let ca_err = |reason: String| TlsError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| ca_err(format!("invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("certificate #{} unusable: {e}", index + 1)))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no CERTIFICATE found in the file".to_owned()));
    }
    Ok(roots)
}

/// Reads the system bundle leniently (large bundles may hold a few certificates webpki rejects).
fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let pem = match std::fs::read(SYSTEM_CA_BUNDLE) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TlsError::NoRootCertificates);
        }
        Err(e) => {
            return Err(TlsError::CaFile {
                path: PathBuf::from(SYSTEM_CA_BUNDLE),
                reason: e.to_string(),
            });
        }
    };
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
    if roots.is_empty() {
        return Err(TlsError::NoRootCertificates);
    }
    Ok(roots)
}

/// tokio-rustls reports rustls errors as `io::Error`s wrapping a `rustls::Error`; pull the
/// certificate verdicts out so the operator sees "certificate rejected: ..." distinctly.
fn classify_handshake_error(err: io::Error) -> TlsError {
    let certificate = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|inner| match inner {
            rustls::Error::InvalidCertificate(cert_err) => Some(cert_err.clone()),
            _ => None,
        });
    match certificate {
        Some(cert_err) => TlsError::Certificate(cert_err),
        None => TlsError::Handshake(err),
    }
}

/// `require` semantics: any certificate is accepted (no chain, name or expiry check), but the
/// handshake signatures are still verified so the peer proves possession of the key it showed.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    use tokio::net::TcpListener;

    const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

    // ---------- helpers without root ----------

    fn scratch_dir(label: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = PathBuf::from(format!(
            "/tmp/agentgate-pgtls-{}-{label}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    /// A one-shot fake server: accepts one connection and runs `serve` on it.
    async fn fake_server<F, Fut>(serve: F) -> SocketAddr
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            serve(sock).await;
        });
        addr
    }

    async fn expect_ssl_request(sock: &mut TcpStream) {
        let mut req = [0u8; 8];
        sock.read_exact(&mut req).await.unwrap();
        assert_eq!(req, SSL_REQUEST);
    }

    #[test]
    fn tls_mode_config_spelling() {
        for (mode, text) in [
            (TlsMode::Disable, "\"disable\""),
            (TlsMode::Require, "\"require\""),
            (TlsMode::VerifyFull, "\"verify-full\""),
        ] {
            assert_eq!(serde_json::to_string(&mode).unwrap(), text);
            assert_eq!(serde_json::from_str::<TlsMode>(text).unwrap(), mode);
            assert_eq!(format!("\"{mode}\""), text);
        }
        assert_eq!(TlsMode::default(), TlsMode::Disable);
        assert!(serde_json::from_str::<TlsMode>("\"verify-ca\"").is_err());
    }

    #[test]
    fn construction_errors_are_named() {
        let dir = scratch_dir("cfg");
        let missing = dir.join("missing.pem");
        let err = UpstreamTls::new(TlsMode::VerifyFull, Some(&missing), "localhost").unwrap_err();
        assert!(
            matches!(err, TlsError::CaFile { ref path, .. } if *path == missing),
            "{err}"
        );

        let no_cert = dir.join("empty.pem");
        std::fs::write(&no_cert, "not a pem file\n").unwrap();
        let err = UpstreamTls::new(TlsMode::VerifyFull, Some(&no_cert), "localhost").unwrap_err();
        assert!(matches!(err, TlsError::CaFile { .. }), "{err}");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = UpstreamTls::new(TlsMode::VerifyFull, Some(&garbage), "localhost").unwrap_err();
        assert!(matches!(err, TlsError::CaFile { .. }), "{err}");

        for bad in ["", "bad name!", "[]"] {
            let err = UpstreamTls::new(TlsMode::Require, None, bad).unwrap_err();
            assert!(
                matches!(err, TlsError::InvalidServerName(_)),
                "{bad:?}: {err}"
            );
        }
        // IP literals, bracketed IPv6 and DNS names are all fine.
        for good in ["127.0.0.1", "::1", "[::1]", "db.internal", "localhost"] {
            UpstreamTls::new(TlsMode::Require, None, good).unwrap();
        }
        // disable ignores both the CA file and the name.
        let plain = UpstreamTls::new(TlsMode::Disable, Some(&missing), "").unwrap();
        assert_eq!(plain.mode(), TlsMode::Disable);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn verify_full_without_ca_file_uses_system_roots() {
        let result = UpstreamTls::new(TlsMode::VerifyFull, None, "localhost");
        if Path::new(SYSTEM_CA_BUNDLE).exists() {
            assert_eq!(result.unwrap().mode(), TlsMode::VerifyFull);
        } else {
            assert!(matches!(result, Err(TlsError::NoRootCertificates)));
        }
    }

    #[tokio::test]
    async fn disable_sends_nothing_before_the_caller() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr = fake_server(|mut sock| async move {
            let mut first = [0u8; 5];
            sock.read_exact(&mut first).await.unwrap();
            tx.send(first).unwrap();
        })
        .await;
        let tls = UpstreamTls::new(TlsMode::Disable, None, "localhost").unwrap();
        let mut stream = tls
            .wrap(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        assert!(!stream.is_tls());
        stream.write_all(b"hello").await.unwrap();
        assert_eq!(&rx.await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn refusal_and_unexpected_replies() {
        for (reply, mode) in [
            (b'N', TlsMode::Require),
            (b'N', TlsMode::VerifyFull),
            (b'E', TlsMode::Require),
            (b'X', TlsMode::Require),
        ] {
            let addr = fake_server(move |mut sock| async move {
                expect_ssl_request(&mut sock).await;
                // An 'E' is followed by an (untrusted) error message, which must not be read.
                sock.write_all(&[reply, 0, 0, 0, 9, b'S', b'x', 0, 0])
                    .await
                    .unwrap();
                let _ = sock.read(&mut [0u8; 1]).await;
            })
            .await;
            let tls = UpstreamTls::new(mode, None, "localhost").unwrap();
            let err = tls
                .wrap(TcpStream::connect(addr).await.unwrap())
                .await
                .unwrap_err();
            match reply {
                b'N' => {
                    assert!(matches!(err, TlsError::ServerRefusedTls), "{err}");
                    assert!(err.to_string().contains("does not support TLS"), "{err}");
                }
                other => assert!(
                    matches!(err, TlsError::UnexpectedResponse(b) if b == other),
                    "{err}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn server_closing_before_reply_is_io_error() {
        let addr = fake_server(|mut sock| async move {
            expect_ssl_request(&mut sock).await;
        })
        .await;
        let tls = UpstreamTls::new(TlsMode::Require, None, "localhost").unwrap();
        let err = tls
            .wrap(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(err, TlsError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err}"
        );
    }

    /// CVE-2021-23222: plaintext injected right after 'S' (here a forged AuthenticationOk)
    /// must reach the TLS layer and fail the handshake, never be taken as protocol data.
    #[tokio::test]
    async fn plaintext_injected_after_s_fails_the_handshake() {
        let addr = fake_server(|mut sock| async move {
            expect_ssl_request(&mut sock).await;
            sock.write_all(b"SR\x00\x00\x00\x08\x00\x00\x00\x00Z\x00\x00\x00\x05I")
                .await
                .unwrap();
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink).await;
        })
        .await;
        let tls = UpstreamTls::new(TlsMode::Require, None, "localhost").unwrap();
        let err = tls
            .wrap(TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Handshake(_)), "{err}");
    }

    // ---------- a real PostgreSQL (root only) ----------

    fn run(cmd: &mut Command, what: &str) -> String {
        let out = cmd
            .current_dir("/tmp")
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn as_postgres(program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
        cmd
    }

    fn chown_postgres(path: &Path) {
        run(
            Command::new("chown").arg("postgres:postgres").arg(path),
            "chown to postgres",
        );
    }

    struct Pki {
        ca: PathBuf,
        other_ca: PathBuf,
        server_crt: PathBuf,
        server_key: PathBuf,
    }

    /// A CA, an unrelated second CA, and a server certificate for localhost / 127.0.0.1.
    fn make_pki(dir: &Path) -> Pki {
        let p = |name: &str| dir.join(name);
        let new_ca = |key: &str, crt: &str, cn: &str| {
            run(
                Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                    .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                    .arg("-keyout")
                    .arg(p(key))
                    .arg("-out")
                    .arg(p(crt))
                    .args(["-subj", &format!("/CN={cn}")])
                    .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                    .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
                "openssl: make CA",
            );
        };
        new_ca("ca.key", "ca.crt", "agentgate test CA");
        new_ca("other-ca.key", "other-ca.crt", "agentgate unrelated CA");
        run(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                ])
                .arg("-nodes")
                .arg("-keyout")
                .arg(p("server.key"))
                .arg("-out")
                .arg(p("server.csr"))
                .args(["-subj", "/CN=localhost"]),
            "openssl: server CSR",
        );
        std::fs::write(
            p("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(p("server.csr"))
                .arg("-CA")
                .arg(p("ca.crt"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(p("server.ext"))
                .arg("-out")
                .arg(p("server.crt")),
            "openssl: sign server certificate",
        );
        std::fs::set_permissions(p("server.crt"), std::fs::Permissions::from_mode(0o644)).unwrap();
        chown_postgres(&p("server.key"));
        std::fs::set_permissions(p("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        Pki {
            ca: p("ca.crt"),
            other_ca: p("other-ca.crt"),
            server_crt: p("server.crt"),
            server_key: p("server.key"),
        }
    }

    /// A throwaway cluster; dropping it stops the server and removes its files.
    struct PgServer {
        base: PathBuf,
        data: PathBuf,
        port: u16,
        pki: Pki,
    }

    impl PgServer {
        fn start(label: &str, ssl: bool) -> PgServer {
            crate::test_support::require_root("to run initdb and postgres as the `postgres` user");
            let base = scratch_dir(label);
            let certs = base.join("certs");
            std::fs::create_dir(&certs).unwrap();
            std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).unwrap();
            let pki = make_pki(&certs);
            let run_dir = base.join("run");
            let data = base.join("data");
            for dir in [&run_dir, &data] {
                std::fs::create_dir(dir).unwrap();
                chown_postgres(dir);
            }
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            // From here on, Drop cleans up even if a step below panics.
            let server = PgServer {
                base,
                data,
                port,
                pki,
            };
            run(
                as_postgres("initdb")
                    .arg("-D")
                    .arg(&server.data)
                    .args(["--auth-host=trust", "--auth-local=trust", "--no-sync"])
                    .args(["-U", "postgres", "--locale=C", "-E", "UTF8"]),
                "initdb",
            );
            let mut opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c ssl={}",
                run_dir.display(),
                if ssl { "on" } else { "off" }
            );
            if ssl {
                opts.push_str(&format!(
                    " -c ssl_cert_file={} -c ssl_key_file={}",
                    server.pki.server_crt.display(),
                    server.pki.server_key.display()
                ));
            }
            let log = run_dir.join("postgres.log");
            let started = as_postgres("pg_ctl")
                .arg("-D")
                .arg(&server.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .current_dir("/tmp")
                .output()
                .unwrap();
            assert!(
                started.status.success(),
                "pg_ctl start failed: {}{}\nserver log:\n{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            let ready = (0..100).any(|_| {
                let ok = Command::new(format!("{PG_BIN}/pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ok
            });
            assert!(ready, "pg_isready never succeeded on port {port}");
            server
        }

        async fn connect(&self) -> TcpStream {
            TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
        }
    }

    impl Drop for PgServer {
        fn drop(&mut self) {
            let _ = as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .current_dir("/tmp")
                .output();
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    /// Speaks a v3 StartupMessage (written by hand) and expects AuthenticationOk (trust auth).
    async fn startup_gets_auth_ok(stream: &mut UpstreamStream) {
        let params = b"user\0postgres\0database\0postgres\0\0";
        let len = u32::try_from(8 + params.len()).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(&196_608u32.to_be_bytes());
        msg.extend_from_slice(params);
        stream.write_all(&msg).await.unwrap();
        stream.flush().await.unwrap();
        let mut reply = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut reply))
            .await
            .expect("server reply timed out")
            .unwrap();
        assert_eq!(
            reply,
            [b'R', 0, 0, 0, 8, 0, 0, 0, 0],
            "expected AuthenticationOk, got {reply:?}"
        );
        // Terminate politely.
        stream.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
        let _ = stream.shutdown().await;
    }

    #[tokio::test]
    async fn real_postgres_with_tls() {
        let pg = PgServer::start("ssl", true);

        // require: encrypted, certificate not checked (the name does not even match).
        let tls = UpstreamTls::new(TlsMode::Require, None, "not-the-server.example").unwrap();
        let mut stream = tls.wrap(pg.connect().await).await.unwrap();
        assert!(stream.is_tls());
        startup_gets_auth_ok(&mut stream).await;

        // verify-full with the right CA, by DNS name and by IP address.
        for name in ["localhost", "127.0.0.1"] {
            let tls = UpstreamTls::new(TlsMode::VerifyFull, Some(&pg.pki.ca), name).unwrap();
            let mut stream = tls
                .wrap(pg.connect().await)
                .await
                .unwrap_or_else(|e| panic!("verify-full as {name}: {e}"));
            assert!(stream.is_tls());
            startup_gets_auth_ok(&mut stream).await;
        }

        // verify-full with an unrelated CA: certificate error (unknown issuer).
        let tls =
            UpstreamTls::new(TlsMode::VerifyFull, Some(&pg.pki.other_ca), "localhost").unwrap();
        let err = tls.wrap(pg.connect().await).await.unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Certificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err}"
        );
        assert!(err.to_string().contains("certificate rejected"), "{err}");

        // verify-full with the right CA but a name the certificate does not carry.
        for name in ["wrong.example", "127.0.0.2"] {
            let tls = UpstreamTls::new(TlsMode::VerifyFull, Some(&pg.pki.ca), name).unwrap();
            let err = tls.wrap(pg.connect().await).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    TlsError::Certificate(
                        rustls::CertificateError::NotValidForName
                            | rustls::CertificateError::NotValidForNameContext { .. }
                    )
                ),
                "{name}: {err}"
            );
        }

        // disable: plain stream, no SSLRequest, the server still lets us in.
        let tls = UpstreamTls::new(TlsMode::Disable, None, "localhost").unwrap();
        let mut stream = tls.wrap(pg.connect().await).await.unwrap();
        assert!(!stream.is_tls());
        startup_gets_auth_ok(&mut stream).await;
    }

    #[tokio::test]
    async fn real_postgres_without_tls() {
        let pg = PgServer::start("nossl", false);

        for mode in [TlsMode::Require, TlsMode::VerifyFull] {
            let tls = UpstreamTls::new(mode, Some(&pg.pki.ca), "localhost").unwrap();
            let err = tls.wrap(pg.connect().await).await.unwrap_err();
            assert!(matches!(err, TlsError::ServerRefusedTls), "{mode}: {err}");
            assert!(err.to_string().contains("does not support TLS"), "{err}");
        }

        let tls = UpstreamTls::new(TlsMode::Disable, None, "localhost").unwrap();
        let mut stream = tls.wrap(pg.connect().await).await.unwrap();
        assert!(!stream.is_tls());
        startup_gets_auth_ok(&mut stream).await;
    }
}
