//! The shared conformance suite, run against NATS with JetStream (`BGTASK_NATS_URL`, default
//! `nats://127.0.0.1:4222`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, Result};
use bgtask_nats::NatsBroker;

/// Brokers on the test server, or behind a fault proxy with ~1 s timeouts, pings and backoff.
pub struct NatsFactory;

#[async_trait]
impl BrokerFactory for NatsFactory {
    async fn broker(&self) -> DynBroker {
        Arc::new(common::broker().await)
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        Some(common::server_addr())
    }

    async fn broker_via(&self, addr: SocketAddr) -> Result<DynBroker> {
        let broker = NatsBroker::connect_with(common::fault_config(addr)).await?;
        Ok(Arc::new(broker))
    }
}

bgtask_conformance::conformance_suite!(NatsFactory);
