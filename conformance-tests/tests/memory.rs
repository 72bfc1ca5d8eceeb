//! The conformance suite against the embedded [`MemoryBroker`].

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, Error, ErrorKind, MemoryBroker};

/// Every broker of one scenario is the same in-process broker, as in one process.
struct MemoryFactory(MemoryBroker);

impl MemoryFactory {
    fn new() -> Self {
        MemoryFactory(MemoryBroker::new())
    }
}

#[async_trait]
impl BrokerFactory for MemoryFactory {
    async fn broker(&self) -> DynBroker {
        Arc::new(self.0.clone())
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn broker_via(&self, _addr: SocketAddr) -> bgtask_core::Result<DynBroker> {
        Err(Error::new(
            ErrorKind::Config,
            "the memory broker has no connection",
        ))
    }
}

bgtask_conformance::conformance_suite!(MemoryFactory::new());
