//! The core of bgtask: the [`Broker`] contract, the task protocol ([`Client`], [`Worker`]) built on
//! it, and [`MemoryBroker`], the embedded backend for one process.
//!
//! Users depend on the `bgtask` facade crate, which re-exports everything here; backend authors
//! depend on this crate and on `bgtask-conformance`.
#![deny(missing_docs)]

pub mod backoff;
pub mod broker;
pub mod connection;
pub mod error;
pub mod gap;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod protocol;
mod status;
pub mod supervisor;

pub use broker::{
    Acquired, Admission, Broker, Capabilities, DynBroker, Incoming, KeyCount, KeyPage, KeyedOffer,
    LeaseId, LeaseInfo, LeaseRequest, Published, Subscription, MAX_KEY_PAGE,
};
pub use connection::ConnectionSettings;
pub use error::{BoxError, Error, ErrorDetail, ErrorKind, Result};
pub use memory::MemoryBroker;
pub use names::Namespace;
pub use protocol::*;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::protocol::fuzz::*;
}

/// Entry points for the criterion benchmarks in `benches/`; not part of the API.
///
/// The envelope encoder and decoder and the task-key extraction are internal; these are thin
/// wrappers that build the messages a creator and a worker exchange. The channel and key layout
/// ([`Namespace`](crate::Namespace)) and [`validate_name`](crate::names::validate_name) are public
/// already.
#[doc(hidden)]
pub mod __bench {
    pub use crate::protocol::bench::*;
}
