//! `tls://` against private `nats-server`s with certificates made here (rcgen): a server that
//! the client verifies by a CA file, one that also verifies the client's certificate, and the
//! errors when the CA is not trusted or the server does not speak TLS.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bgtask_core::{Broker, ErrorKind, Incoming, LeaseRequest};
use bgtask_nats::{NatsBroker, NatsConfig};
use bytes::Bytes;
use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use common::PrivateServer;

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in a directory of their own (removed when dropped).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "bgtask-nats-tls-{}",
            bgtask_core::names::random_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (name, sans) in [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ),
            ("client", vec!["bgtask-client".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        }
        // Another CA, which signed nothing the server uses.
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--tlscert".into(),
            self.path("server.pem"),
            "--tlskey".into(),
            self.path("server-key.pem"),
        ]
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(args: &[String]) -> PrivateServer {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    PrivateServer::start(&args)
}

async fn round_trip(broker: &NatsBroker) {
    let mut sub = broker.subscribe("secure").await.unwrap();
    broker
        .publish("secure", Bytes::from_static(b"sealed"))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap();
    assert_eq!(got, Some(Incoming::Message(Bytes::from_static(b"sealed"))));
    let acquired = broker
        .acquire("k", LeaseRequest::new(Duration::from_secs(5)).cap(1))
        .await
        .unwrap();
    assert!(acquired.lease.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_a_password() {
    let pki = Pki::new();
    let mut args = pki.server_args();
    args.extend(["--user", "app", "--pass", "tls-secret"].map(String::from));
    let server = start(&args);
    let url = server.url(Some("app:tls-secret"));
    assert!(url.starts_with("tls://"));
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&url).with_tls_root_certificate(pki.path("ca.pem")),
    )
    .await
    .expect("connect over TLS");
    round_trip(&broker).await;

    let err = NatsBroker::connect_with(
        NatsConfig::new(server.url(Some("app:wrong-tls-secret")))
            .with_tls_root_certificate(pki.path("ca.pem")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!format!("{err:?}").contains("wrong-tls-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_certificate_is_a_config_error() {
    let pki = Pki::new();
    let server = start(&pki.server_args());
    let started = tokio::time::Instant::now();
    let err = NatsBroker::connect_with(
        NatsConfig::new(server.url(None)).with_tls_root_certificate(pki.path("other-ca.pem")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A CA file that does not exist is a Config error as well.
    let err = NatsBroker::connect_with(
        NatsConfig::new(server.url(None))
            .with_tls_root_certificate(Path::new("/nonexistent/ca.pem")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_for_servers_that_verify_clients() {
    let pki = Pki::new();
    let mut args = pki.server_args();
    args.extend([
        "--tlsverify".into(),
        "--tlscacert".into(),
        pki.path("ca.pem"),
    ]);
    let server = start(&args);
    let config = NatsConfig::new(server.url(None)).with_tls_root_certificate(pki.path("ca.pem"));
    let broker = NatsBroker::connect_with(
        config
            .clone()
            .with_tls_client_certificate(pki.path("client.pem"), pki.path("client-key.pem")),
    )
    .await
    .expect("connect with a client certificate");
    round_trip(&broker).await;
    let err = NatsBroker::connect_with(config.with_connect_timeout(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Config | ErrorKind::Unavailable),
        "{err}"
    );
}
