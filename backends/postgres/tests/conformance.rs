//! The shared conformance suite, run against PostgreSQL (`BGTASK_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), each scenario in a schema of its own.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, Result};
use bgtask_postgres::PostgresBroker;

use common::TestSchema;

/// Brokers on the test server, or behind a fault proxy with ~1 s timeouts and backoff, all on
/// one schema per scenario, dropped when the scenario ends.
pub struct PostgresFactory {
    schema: TestSchema,
}

impl PostgresFactory {
    /// A factory with a new schema.
    pub fn new() -> Self {
        PostgresFactory {
            schema: TestSchema::new(),
        }
    }
}

impl Default for PostgresFactory {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl BrokerFactory for PostgresFactory {
    async fn broker(&self) -> DynBroker {
        Arc::new(self.schema.broker().await)
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        Some(common::server_addr())
    }

    async fn broker_via(&self, addr: SocketAddr) -> Result<DynBroker> {
        let broker = PostgresBroker::connect_with(self.schema.fault_config(addr)).await?;
        Ok(Arc::new(broker))
    }
}

bgtask_conformance::conformance_suite!(PostgresFactory::new());
