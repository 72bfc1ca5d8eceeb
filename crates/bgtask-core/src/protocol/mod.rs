//! The task protocol, built on [`Broker`](crate::Broker) only.

mod envelope;
pub use envelope::Status;
