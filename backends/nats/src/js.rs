//! The few JetStream API calls the leases and claims need, as plain requests with hand-written
//! JSON.
//!
//! async-nats' typed JetStream API is not used: its replies are parsed into structs that follow
//! the newest server, and a reply from an older server that does not fit surfaces as "data did
//! not match any variant of untagged enum Response" (its key-value buckets cannot be created on
//! nats-server 2.9 that way). The requests below are the documented JetStream wire API
//! (`$JS.API.STREAM.CREATE`, `.INFO`, `.MSG.GET`, `.MSG.DELETE`, and publishing with
//! `Nats-Expected-*` headers), and the replies are read leniently: only the fields used here.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{Client, HeaderMap};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bgtask_core::{Error, ErrorKind, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::from_request;
use crate::time::parse_rfc3339_nanos;

mod setup;

/// `wrong last sequence: <n>`: a compare-and-set publish lost the race.
const ERR_WRONG_LAST_SEQUENCE: u32 = 10071;
/// `wrong last sequence` (no number): a compare-and-set publish lost the race to another one on
/// the same subject still in flight, on a clustered stream (servers with the fix of
/// nats-server#4320, 2.9.21 and later).
const ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT: u32 = 10164;
/// `no message found` (get and delete).
const ERR_NO_MESSAGE: u32 = 10037;
/// `no message found` as the delete API words it.
const ERR_NO_MESSAGE_DELETE: u32 = 10057;
/// `sequence <n> not found` (delete of a message that was replaced or deleted).
const ERR_SEQUENCE_NOT_FOUND: u32 = 10043;
/// `stream not found`.
const ERR_STREAM_NOT_FOUND: u32 = 10059;
/// `stream name already in use with a different configuration`.
const ERR_STREAM_EXISTS: u32 = 10058;
/// `replicas > 1 not supported in non-clustered mode`.
const ERR_REPLICAS_NOT_CLUSTERED: u32 = 10074;
/// `no suitable peers for placement`.
const ERR_NO_PEERS: u32 = 10005;
/// `insufficient resources`.
const ERR_INSUFFICIENT_RESOURCES: u32 = 10023;
/// `invalid per-message TTL` (server 2.11+).
const ERR_TTL_INVALID: u32 = 10165;
/// `per-message TTL is disabled` (server 2.11+, a stream without `allow_msg_ttl`).
const ERR_TTL_DISABLED: u32 = 10166;

/// An error reply of the JetStream API.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiError {
    #[serde(default)]
    pub(crate) code: u16,
    #[serde(default)]
    pub(crate) err_code: u32,
    #[serde(default)]
    pub(crate) description: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (code {}, err_code {})",
            self.description, self.code, self.err_code
        )
    }
}

impl std::error::Error for ApiError {}

/// The stream configuration the backend creates, in the API's JSON.
#[derive(Debug, Serialize)]
struct StreamConfigOut<'a> {
    name: &'a str,
    subjects: Vec<String>,
    retention: &'static str,
    max_consumers: i64,
    max_msgs: i64,
    max_bytes: i64,
    max_age: u64,
    max_msgs_per_subject: i64,
    max_msg_size: i64,
    storage: &'static str,
    discard: &'static str,
    num_replicas: u32,
    duplicate_window: u64,
    deny_delete: bool,
    deny_purge: bool,
    allow_rollup_hdrs: bool,
    /// Per-message TTLs (server 2.11+); older servers ignore the field and do not echo it.
    allow_msg_ttl: bool,
}

/// The fields of a stream configuration the backend checks.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct StreamConfigIn {
    #[serde(default)]
    pub(crate) subjects: Vec<String>,
    #[serde(default)]
    pub(crate) max_age: u64,
    #[serde(default)]
    pub(crate) max_msgs_per_subject: i64,
    #[serde(default)]
    pub(crate) retention: String,
    #[serde(default)]
    pub(crate) deny_delete: bool,
    #[serde(default)]
    pub(crate) allow_msg_ttl: bool,
    #[serde(default)]
    pub(crate) num_replicas: u32,
    #[serde(default)]
    pub(crate) sealed: bool,
    #[serde(default)]
    pub(crate) mirror: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct StreamReply {
    error: Option<ApiError>,
    config: Option<StreamConfigIn>,
}

/// A `STREAM.INFO` reply asked for subjects: one page of them, and how many there are.
#[derive(Debug, Deserialize)]
struct SubjectsReply {
    error: Option<ApiError>,
    state: Option<SubjectsState>,
    total: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct SubjectsState {
    subjects: Option<std::collections::HashMap<String, u64>>,
}

#[derive(Debug, Deserialize)]
struct MsgGetReply {
    error: Option<ApiError>,
    message: Option<StoredMessageJson>,
}

#[derive(Debug, Deserialize)]
struct StoredMessageJson {
    seq: u64,
    #[serde(default)]
    data: Option<String>,
    time: String,
}

#[derive(Debug, Deserialize)]
struct DeleteReply {
    error: Option<ApiError>,
    #[serde(default)]
    success: bool,
}

#[derive(Debug, Deserialize)]
struct PubAck {
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
}

/// A message read back from the stream.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    /// When the server stored it: nanoseconds since the Unix epoch, by the server's clock.
    pub(crate) time_nanos: u64,
    pub(crate) data: Vec<u8>,
}

/// The outcome of reading a subject's last message.
#[derive(Debug)]
pub(crate) enum Got {
    Message(Stored),
    /// The subject has no message.
    Empty,
    /// The stream does not exist (it was deleted): create it and try again.
    NoStream,
}

/// The outcome of a compare-and-set publish.
#[derive(Debug)]
pub(crate) enum Cas {
    /// Stored, with this stream sequence.
    Stored(u64),
    /// The subject's last sequence was not the expected one.
    Conflict,
    /// No stream captures the subject (it was deleted): create it and try again.
    NoStream,
    /// The server refused the per-message TTL: the stream does not keep them after all.
    TtlRefused,
}

/// The outcome of a delete by sequence.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Deleted {
    Yes,
    /// The message was already gone (replaced by a newer one, or deleted).
    Gone,
    NoStream,
}

/// One of the backend's streams (the lease stream or the claim stream), reached over a client.
#[derive(Debug, Clone)]
pub(crate) struct Js {
    client: Client,
    stream: String,
    /// What the stream holds, for messages: `lease` or `claim`.
    holds: &'static str,
    /// The replicas the stream is created with.
    replicas: u32,
    /// How many servers the connected server says its cluster has (0: not in a cluster), for
    /// error messages.
    cluster_servers: usize,
    /// The server's version, when it cannot keep compare-and-set writes exclusive on a
    /// replicated stream (an existing stream with replicas is then refused).
    unsafe_replicated: Option<String>,
    /// The record operations as error messages name them ("read a lease record", …), built
    /// once rather than per request.
    reading: String,
    writing: String,
    deleting: String,
}

/// What [`Js::ensure_stream`] found.
#[derive(Debug, Clone)]
pub(crate) struct StreamFacts {
    /// The stream's `max_age`: the longest anything lives in it.
    pub(crate) max_age: Duration,
    /// The server keeps per-message TTLs on this stream (2.11+, `allow_msg_ttl`).
    pub(crate) message_ttl: bool,
    /// The stream's replicas.
    pub(crate) replicas: u32,
}

impl Js {
    /// The stream `stream`, which holds `holds` (`lease` or `claim`, for messages).
    pub(crate) fn new(client: Client, stream: &str, holds: &'static str) -> Js {
        Js {
            client,
            stream: stream.to_owned(),
            holds,
            replicas: 1,
            cluster_servers: 0,
            unsafe_replicated: None,
            reading: format!("read a {holds} record"),
            writing: format!("write a {holds} record"),
            deleting: format!("delete a {holds} record"),
        }
    }

    /// Create the stream with `replicas` replicas, on a server of version `version` that
    /// reports a cluster of `cluster_servers` servers (0: none).
    pub(crate) fn with_replicas(
        mut self,
        replicas: u32,
        cluster_servers: usize,
        version: &str,
    ) -> Js {
        self.replicas = replicas;
        self.cluster_servers = cluster_servers;
        self.unsafe_replicated = (!keeps_replicated_cas(version)).then(|| version.to_owned());
        self
    }

    pub(crate) fn stream(&self) -> &str {
        &self.stream
    }

    /// The largest message the server accepts, from its `INFO`.
    pub(crate) fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// One request to the JetStream API, with the reply's JSON.
    async fn api<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        subject: String,
        body: Vec<u8>,
    ) -> Result<T> {
        let reply = match self.client.request(subject, Bytes::from(body)).await {
            Ok(reply) => reply,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "nats: the JetStream API does not answer {what} (JetStream is disabled \
                         or not ready; start nats-server with -js)"
                    ),
                ))
            }
            Err(e) => return Err(from_request(what, e)),
        };
        serde_json::from_slice(&reply.payload).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("nats: unexpected JetStream reply to {what}"),
            )
            .with_source(e)
        })
    }

    /// Every subject of the stream that matches `filter` and holds a message: `STREAM.INFO`
    /// with `subjects_filter`, page after page (the server sends a bounded number per reply).
    pub(crate) async fn subjects(&self, filter: &str) -> Result<Vec<String>> {
        let what = format!("list the {} subjects", self.holds);
        let mut subjects = Vec::new();
        loop {
            let body = serde_json::json!({"subjects_filter": filter, "offset": subjects.len()});
            let reply: SubjectsReply = self
                .api(
                    &what,
                    format!("$JS.API.STREAM.INFO.{}", self.stream),
                    body.to_string().into_bytes(),
                )
                .await?;
            if let Some(error) = reply.error {
                return Err(api_error(&what, Some(error), ErrorKind::Unavailable));
            }
            let page = reply.state.and_then(|s| s.subjects).unwrap_or_default();
            let got = page.len();
            subjects.extend(page.into_keys());
            if got == 0 || reply.total.is_none_or(|total| subjects.len() >= total) {
                return Ok(subjects);
            }
        }
    }

    /// The last message of `subject`.
    pub(crate) async fn last(&self, subject: &str) -> Result<Got> {
        let body = serde_json::to_vec(&serde_json::json!({ "last_by_subj": subject }))
            .expect("a request serializes");
        let what = self.reading.as_str();
        let reply: MsgGetReply = self
            .api(
                what,
                format!("$JS.API.STREAM.MSG.GET.{}", self.stream),
                body,
            )
            .await?;
        match reply {
            MsgGetReply {
                message: Some(m),
                error: None,
            } => {
                let time_nanos = parse_rfc3339_nanos(&m.time).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Protocol,
                        format!("nats: JetStream sent an unreadable timestamp {:?}", m.time),
                    )
                })?;
                let data = match m.data {
                    Some(data) => STANDARD.decode(data).map_err(|e| {
                        Error::new(ErrorKind::Protocol, "nats: JetStream sent unreadable data")
                            .with_source(e)
                    })?,
                    None => Vec::new(),
                };
                Ok(Got::Message(Stored {
                    seq: m.seq,
                    time_nanos,
                    data,
                }))
            }
            MsgGetReply { error: Some(e), .. } if e.err_code == ERR_NO_MESSAGE => Ok(Got::Empty),
            MsgGetReply { error: Some(e), .. } if e.err_code == ERR_STREAM_NOT_FOUND => {
                Ok(Got::NoStream)
            }
            MsgGetReply { error, .. } => Err(api_error(what, error, ErrorKind::Protocol)),
        }
    }

    /// Publish `data` to `subject` in the stream, only if the subject's last sequence is
    /// `expected` (0: it has no message).
    pub(crate) async fn publish_if(
        &self,
        subject: &str,
        expected: u64,
        ttl: Option<Duration>,
        data: Vec<u8>,
    ) -> Result<Cas> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Stream", self.stream.as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        if let Some(ttl) = ttl {
            // Whole seconds, at least 1, as the server's per-message TTL wants.
            let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            headers.insert("Nats-TTL", seconds.max(1).to_string().as_str());
        }
        self.publish(subject, headers, data).await
    }

    /// Publish an empty message to `subject` in the stream (a clock).
    pub(crate) async fn touch(&self, subject: &str) -> Result<Cas> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Stream", self.stream.as_str());
        self.publish(subject, headers, Vec::new()).await
    }

    async fn publish(&self, subject: &str, headers: HeaderMap, data: Vec<u8>) -> Result<Cas> {
        let what = self.writing.as_str();
        let reply = match self
            .client
            .request_with_headers(subject.to_owned(), headers, Bytes::from(data))
            .await
        {
            Ok(reply) => reply,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => return Ok(Cas::NoStream),
            Err(e) => return Err(from_request(what, e)),
        };
        let ack: PubAck = serde_json::from_slice(&reply.payload).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("nats: unexpected JetStream reply to a {} write", self.holds),
            )
            .with_source(e)
        })?;
        match ack {
            PubAck {
                error: None, seq, ..
            } if seq > 0 => Ok(Cas::Stored(seq)),
            PubAck { error: Some(e), .. }
                if e.err_code == ERR_WRONG_LAST_SEQUENCE
                    || e.err_code == ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT =>
            {
                Ok(Cas::Conflict)
            }
            PubAck { error: Some(e), .. }
                if e.err_code == ERR_TTL_DISABLED || e.err_code == ERR_TTL_INVALID =>
            {
                tracing::warn!(error = %e, stream = %self.stream, "nats: the stream refuses per-message TTLs");
                Ok(Cas::TtlRefused)
            }
            PubAck { error, .. } => Err(api_error(what, error, ErrorKind::Protocol)),
        }
    }

    /// Delete message `seq`; deleting a message that a newer one replaced is `Gone`, which makes
    /// this a compare-and-delete.
    pub(crate) async fn delete(&self, seq: u64) -> Result<Deleted> {
        let body = serde_json::to_vec(&serde_json::json!({ "seq": seq, "no_erase": true }))
            .expect("a request serializes");
        let what = self.deleting.as_str();
        let reply: DeleteReply = self
            .api(
                what,
                format!("$JS.API.STREAM.MSG.DELETE.{}", self.stream),
                body,
            )
            .await?;
        match reply {
            DeleteReply {
                error: None,
                success: true,
            } => Ok(Deleted::Yes),
            DeleteReply { error: Some(e), .. }
                if matches!(
                    e.err_code,
                    ERR_NO_MESSAGE_DELETE | ERR_NO_MESSAGE | ERR_SEQUENCE_NOT_FOUND
                ) =>
            {
                Ok(Deleted::Gone)
            }
            DeleteReply { error: Some(e), .. } if e.err_code == ERR_STREAM_NOT_FOUND => {
                Ok(Deleted::NoStream)
            }
            DeleteReply { error, .. } => Err(api_error(what, error, ErrorKind::Protocol)),
        }
    }
}

/// The error for a JetStream error reply (or a reply with neither result nor error): `other`
/// for a request the server refused as such.
fn api_error(what: &str, error: Option<ApiError>, other: ErrorKind) -> Error {
    match error {
        Some(e) => {
            let kind = match e.code {
                // Permissions and accounts.
                401 | 403 => ErrorKind::Auth,
                // Cluster without a leader, server shutting down, resources exhausted.
                500 | 503 => ErrorKind::Unavailable,
                _ => other,
            };
            Error::new(kind, format!("nats: JetStream refused to {what}")).with_source(e)
        }
        None => Error::new(
            ErrorKind::Protocol,
            format!("nats: JetStream answered {what} with neither a result nor an error"),
        ),
    }
}

/// Whether nats-server `version` keeps compare-and-set writes (`Nats-Expected-Last-Subject-
/// Sequence`) exclusive on a replicated stream: [`MIN_REPLICATED_SERVER`] or later. A version
/// that does not parse counts as older.
///
/// [`MIN_REPLICATED_SERVER`]: crate::MIN_REPLICATED_SERVER
pub(crate) fn keeps_replicated_cas(version: &str) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or("");
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) => {
            (major, minor, patch) >= crate::MIN_REPLICATED_SERVER
        }
        _ => false,
    }
}

/// The error for replicated lease or claim streams on a server that cannot keep them exclusive.
pub(crate) fn replicated_cas_error(version: &str, what: &str) -> Error {
    let (a, b, c) = crate::MIN_REPLICATED_SERVER;
    Error::new(
        ErrorKind::Config,
        format!(
            "nats: {what}, but nats-server {version} does not keep compare-and-set writes \
             exclusive on a replicated stream (nats-server#4320, #5794): two workers could claim \
             one task; use 1 replica (replicas=1, the default on this server) or nats-server \
             {a}.{b}.{c} or later"
        ),
    )
}

/// The error for a stream that disappeared and could not be created again.
pub(crate) fn stream_missing(stream: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("nats: the stream {stream:?} keeps disappearing"),
    )
}

#[cfg(test)]
mod tests {
    use super::keeps_replicated_cas;

    #[test]
    fn replicated_cas_needs_a_recent_server() {
        for old in ["2.9.10", "2.9.25", "2.10.18", "1.4.0", "", "x.y.z", "2.10"] {
            assert!(!keeps_replicated_cas(old), "{old}");
        }
        for new in ["2.10.19", "2.10.29", "2.11.0", "2.12.1-beta.2", "3.0.0"] {
            assert!(keeps_replicated_cas(new), "{new}");
        }
    }
}
