//! One of the backend's JetStream streams (the lease stream, the claim stream) with what its
//! operations share: checked or created at start, created again when somebody deleted it, and
//! whether it keeps per-message TTLs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bgtask_core::Result;

use crate::js::Js;

/// A stream the backend keeps: created with `max_age`, capturing `subjects`.
#[derive(Debug)]
pub(crate) struct Stream {
    js: Js,
    subjects: Vec<String>,
    /// The `max_age` the backend creates the stream with.
    max_age: Duration,
    /// The longest TTL its records may have: `max_age`, or the existing stream's shorter one.
    max_ttl: Duration,
    /// The stream keeps per-message TTLs (server 2.11+): records carry one.
    message_ttl: AtomicBool,
    /// The stream's replicas when it was opened.
    replicas: u32,
    /// Held while (re)creating the stream.
    creating: tokio::sync::Mutex<()>,
}

impl Stream {
    /// Create the stream of `js`, or check the one that exists.
    pub(crate) async fn open(js: Js, subjects: Vec<String>, max_age: Duration) -> Result<Stream> {
        let facts = js.ensure_stream(subjects.clone(), max_age).await?;
        tracing::debug!(stream = js.stream(), ?facts, "nats: stream ready");
        Ok(Stream {
            js,
            subjects,
            max_age,
            max_ttl: max_age.min(facts.max_age),
            message_ttl: AtomicBool::new(facts.message_ttl),
            replicas: facts.replicas,
            creating: tokio::sync::Mutex::new(()),
        })
    }

    /// The stream's API.
    pub(crate) fn js(&self) -> &Js {
        &self.js
    }

    /// The stream's replicas when it was opened.
    pub(crate) fn replicas(&self) -> u32 {
        self.replicas
    }

    /// The longest TTL a record may have.
    pub(crate) fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Whether records carry a per-message TTL (the server keeps them: 2.11+).
    pub(crate) fn message_ttl(&self) -> bool {
        self.message_ttl.load(Ordering::Relaxed)
    }

    /// The server refused a per-message TTL: write records without one from now on.
    pub(crate) fn ttl_refused(&self) {
        self.message_ttl.store(false, Ordering::Relaxed);
    }

    /// Create the stream again (somebody deleted it).
    pub(crate) async fn recreate(&self) -> Result<()> {
        let _creating = self.creating.lock().await;
        tracing::warn!(
            stream = self.js.stream(),
            "nats: stream missing; creating it"
        );
        let facts = self
            .js
            .ensure_stream(self.subjects.clone(), self.max_age)
            .await?;
        self.message_ttl.store(facts.message_ttl, Ordering::Relaxed);
        Ok(())
    }
}
