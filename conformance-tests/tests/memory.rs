//! The conformance suite against the embedded [`MemoryBroker`].

use std::sync::Arc;

use async_trait::async_trait;
use bgtask_conformance::BrokerFactory;
use bgtask_core::{DynBroker, MemoryBroker};

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
}

bgtask_conformance::conformance_suite!(MemoryFactory::new());
