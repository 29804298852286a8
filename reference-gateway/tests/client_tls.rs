//! `wss://`: the reference client's transport over TLS to a gateway whose certificate is
//! issued by a private CA (generated here). With the CA trusted the client authenticates
//! and makes requests; without it the certificate is refused and the gateway reported
//! unreachable; text that holds no certificate is refused with a specific error.
//!
//! The gateway serves TLS through a listener defined here: `serve` takes any
//! `axum::serve::Listener`, so TLS can terminate in the process as well as at a proxy.

mod app_support;

use std::net::SocketAddr;
use std::sync::Arc;

use app_support::device_with;
use confab_client::app::ClientError;
use confab_client::mls::EngineKind;
use confab_client::transport::TlsError;
use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// Accepts TCP connections and completes a TLS handshake on each; failed handshakes are
/// dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A CA (its certificate as PEM) and a server configuration for `localhost` it issued.
fn private_ca() -> (String, rustls::ServerConfig) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    (ca.pem(), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_pem, server_config) = private_ca();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    let origin = format!("wss://localhost:{port}");
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(server_config)),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(server::serve(
        listener,
        GatewayConfig::new(origin.clone()),
        SqliteStore::open(&dir.path().join("gw.db")).expect("store"),
        server::Environment::default(),
        async {
            let _ = stopped.await;
        },
    ));

    // Trusting the CA: authenticated, and requests are answered.
    let mut trusting = device_with(dir.path(), &origin, 1, 1, EngineKind::OpenMls, |t| {
        assert_eq!(t.trust_pem(ca_pem.as_bytes()).expect("trust"), 1);
    });
    trusting.connect().await.expect("connects over TLS");
    let pool = trusting.top_up_key_packages(3).await.expect("top up");
    assert_eq!(pool.pool_count, 3);
    assert_eq!(
        trusting.devices().await.expect("devices")[0].device,
        trusting.device()
    );

    // Not trusting it: the certificate is refused; the client gives up as unreachable.
    let mut wary = device_with(dir.path(), &origin, 2, 2, EngineKind::MlsRs, |_| {});
    assert!(matches!(
        wary.connect().await,
        Err(ClientError::Unreachable(_))
    ));

    let _ = stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), gateway).await;
}

#[test]
fn certificate_files_without_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    let _client = device_with(
        dir.path(),
        "wss://localhost:1",
        4,
        4,
        EngineKind::OpenMls,
        |t| {
            assert!(matches!(
                t.trust_pem(b"not a certificate"),
                Err(TlsError::NoCertificates)
            ));
            assert!(matches!(
                t.trust_pem(
                    b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
                ),
                Err(TlsError::Pem(_))
            ));
            checked += 1;
        },
    );
    assert_eq!(checked, 1);
}
