//! The conformance suite every bgtask backend passes.
#![deny(missing_docs)]

pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bgtask_core::Broker;

/// How the suite gets brokers of the backend under test. A backend writes one of these.
#[async_trait]
pub trait BrokerFactory: Send + Sync + 'static {
    /// A new broker connected to the test server. Panics with a message saying how to start the
    /// server when it cannot connect.
    async fn broker(&self) -> Arc<dyn Broker>;

    /// The server's address, which the fault proxy forwards to; `None` for an in-process broker.
    fn server_addr(&self) -> Option<SocketAddr>;

    /// A new broker that connects to `addr` (a fault proxy in front of the server) instead of the
    /// server itself, configured with short timeouts and reconnect backoff (about 1 s each) so
    /// outages are noticed quickly. `None` for an in-process broker.
    async fn broker_via(&self, addr: SocketAddr) -> Option<Arc<dyn Broker>>;
}
