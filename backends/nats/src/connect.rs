//! Connecting a [`NatsBroker`]: the JetStream check, the choice of replicas, and the setup of
//! the lease and claim streams.

use std::sync::Arc;

use bgtask_core::{Error, ErrorKind, Result};

use crate::claim::Claims;
use crate::conn::{self, Barrier, Shared};
use crate::error::no_answer;
use crate::js::{self, Js};
use crate::lease::Leases;
use crate::subject::Subjects;
use crate::{config, Inner, NatsBroker, NatsConfig};

impl NatsBroker {
    /// Connect to the server at `url` with default settings.
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that is not a NATS URL or a server without
    /// JetStream, [`ErrorKind::Unavailable`] when the server cannot be reached within the
    /// connect timeout, and [`ErrorKind::Auth`] when it refuses the credentials.
    pub async fn connect(url: &str) -> Result<NatsBroker> {
        Self::connect_with(NatsConfig::new(url)).await
    }

    /// Connect with the given settings; fails like [`connect`](Self::connect).
    pub async fn connect_with(config: NatsConfig) -> Result<NatsBroker> {
        config.validate()?;
        let shared = Shared::new();
        let client = conn::connect(&config, &shared).await?;
        let info = client.server_info();
        let shown = config.redacted_url();
        if !info.jetstream {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "nats server {} at {shown} has no JetStream, which bgtask-nats needs for \
                     leases: start it with -js",
                    info.version
                ),
            ));
        }
        let subjects = Subjects::new(&config.subject_prefix);
        let cluster_servers = if info.cluster.is_some() {
            info.connect_urls.len()
        } else {
            0
        };
        let replicated_ok = js::keeps_replicated_cas(&info.version);
        let replicas = match config.asked_replicas()? {
            Some(n) if n > 1 && !replicated_ok => {
                return Err(js::replicated_cas_error(
                    &info.version,
                    &format!("replicas={n} was asked for"),
                ))
            }
            Some(n) => n,
            None if cluster_servers >= config::CLUSTER_REPLICAS as usize => {
                if replicated_ok {
                    config::CLUSTER_REPLICAS
                } else {
                    tracing::warn!(
                        server = %info.version,
                        "nats: the server is in a cluster, but its version cannot keep leases \
                         and claims exclusive on replicated streams (nats-server#4320): the lease \
                         and claim streams get 1 replica; upgrade to 2.10.19 or later for 3"
                    );
                    1
                }
            }
            None => 1,
        };
        let setup = async {
            let barrier = Arc::new(Barrier::start(&client, config.connection.op_timeout).await?);
            let js = |stream: &str, what| {
                Js::new(client.clone(), stream, what).with_replicas(
                    replicas,
                    cluster_servers,
                    &info.version,
                )
            };
            let (leases, claims) = futures::try_join!(
                Leases::start(
                    js(&config.lease_stream, "lease"),
                    subjects.clone(),
                    config.connection.op_timeout,
                    config.lease_max_ttl,
                ),
                Claims::start(
                    js(&config.claim_stream(), "claim"),
                    subjects.clone(),
                    config.connection.op_timeout,
                    config.lease_max_ttl,
                ),
            )?;
            Ok::<_, Error>((barrier, leases, claims))
        };
        let (barrier, leases, claims) =
            match tokio::time::timeout(config.connection.connect_timeout, setup).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(no_answer(
                        "the connection setup",
                        config.connection.connect_timeout,
                    ))
                }
            };
        let lifeline = conn::watch_reconnects(
            &client,
            barrier.clone(),
            shared.clone(),
            config.connection.op_timeout,
        );
        tracing::debug!(
            url = %shown,
            server = %info.version,
            max_payload = info.max_payload,
            cluster = ?info.cluster,
            replicas,
            "nats: broker connected"
        );
        Ok(NatsBroker {
            inner: Arc::new(Inner {
                config,
                client,
                shared,
                barrier,
                lifeline,
                subjects,
                leases,
                claims,
                server_version: info.version,
            }),
        })
    }
}
