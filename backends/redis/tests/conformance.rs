//! The shared conformance suite, run against Redis (`BGTASK_REDIS_URL`, default
//! `redis://127.0.0.1:6379`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, Result};
use bgtask_redis::RedisBroker;

/// Brokers on the test server, or behind a fault proxy with ~1 s timeouts and backoff.
pub struct RedisFactory;

#[async_trait]
impl BrokerFactory for RedisFactory {
    async fn broker(&self) -> DynBroker {
        Arc::new(common::broker().await)
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        Some(common::server_addr())
    }

    async fn broker_via(&self, addr: SocketAddr) -> Result<DynBroker> {
        let broker = RedisBroker::connect_with(common::fault_config(addr)).await?;
        Ok(Arc::new(broker))
    }
}

bgtask_conformance::conformance_suite!(RedisFactory);
