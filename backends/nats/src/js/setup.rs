//! Stream setup: creating the stream, or checking the one that exists, and the error for
//! replicas the cluster cannot place.

use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};

use super::{
    api_error, replicated_cas_error, ApiError, Js, StreamConfigIn, StreamConfigOut, StreamFacts,
    StreamReply, ERR_INSUFFICIENT_RESOURCES, ERR_NO_PEERS, ERR_REPLICAS_NOT_CLUSTERED,
    ERR_STREAM_EXISTS,
};

impl Js {
    /// Create the stream, or find the one that exists, and check that it is usable:
    /// it captures `subjects`, keeps one message per subject, and allows deletes.
    pub(crate) async fn ensure_stream(
        &self,
        subjects: Vec<String>,
        max_age: Duration,
    ) -> Result<StreamFacts> {
        let config = StreamConfigOut {
            name: &self.stream,
            subjects: subjects.clone(),
            retention: "limits",
            max_consumers: -1,
            max_msgs: -1,
            max_bytes: -1,
            max_age: u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX),
            max_msgs_per_subject: 1,
            max_msg_size: -1,
            storage: "file",
            discard: "old",
            num_replicas: self.replicas,
            duplicate_window: Duration::from_secs(1).as_nanos() as u64,
            deny_delete: false,
            deny_purge: false,
            allow_rollup_hdrs: false,
            allow_msg_ttl: true,
        };
        let body = serde_json::to_vec(&config).expect("a stream config serializes");
        let create = format!("create the {} stream", self.holds);
        let created: StreamReply = self
            .api(
                &create,
                format!("$JS.API.STREAM.CREATE.{}", self.stream),
                body,
            )
            .await?;
        let found = match created {
            StreamReply {
                config: Some(config),
                error: None,
            } => config,
            StreamReply { error: Some(e), .. } if e.err_code == ERR_STREAM_EXISTS => {
                let read = format!("read the {} stream", self.holds);
                let info: StreamReply = self
                    .api(
                        &read,
                        format!("$JS.API.STREAM.INFO.{}", self.stream),
                        Vec::new(),
                    )
                    .await?;
                match info {
                    StreamReply {
                        config: Some(config),
                        error: None,
                    } => config,
                    StreamReply { error, .. } => {
                        return Err(api_error(&read, error, ErrorKind::Config))
                    }
                }
            }
            StreamReply { error: Some(e), .. }
                if matches!(
                    e.err_code,
                    ERR_REPLICAS_NOT_CLUSTERED | ERR_NO_PEERS | ERR_INSUFFICIENT_RESOURCES
                ) =>
            {
                return Err(self.placement_error(e))
            }
            StreamReply { error, .. } => return Err(api_error(&create, error, ErrorKind::Config)),
        };
        self.check(&found, &subjects)?;
        if let (true, Some(version)) = (found.num_replicas > 1, &self.unsafe_replicated) {
            return Err(replicated_cas_error(
                version,
                &format!(
                    "the existing {} stream {:?} has {} replicas",
                    self.holds, self.stream, found.num_replicas
                ),
            ));
        }
        if found.num_replicas != 0 && found.num_replicas != self.replicas {
            tracing::warn!(
                stream = %self.stream,
                replicas = found.num_replicas,
                wanted = self.replicas,
                "nats: the existing stream is used with the replicas it has; change them with \
                 `nats stream edit --replicas` if needed"
            );
        }
        Ok(StreamFacts {
            max_age: if found.max_age == 0 {
                Duration::MAX
            } else {
                Duration::from_nanos(found.max_age)
            },
            message_ttl: found.allow_msg_ttl,
            replicas: found.num_replicas.max(1),
        })
    }

    /// The error for a stream the cluster cannot place with its replicas.
    fn placement_error(&self, e: ApiError) -> Error {
        let (replicas, stream, holds) = (self.replicas, &self.stream, self.holds);
        let cluster = match self.cluster_servers {
            0 => "the server is not in a cluster".to_owned(),
            1 => "the cluster has 1 server".to_owned(),
            n => format!("the cluster of {n} servers cannot place them (a server may be down or without JetStream)"),
        };
        Error::new(
            ErrorKind::Config,
            format!(
                "nats: the {holds} stream {stream:?} needs {replicas} replicas but {cluster}: \
                 set replicas=1 (NatsConfig::with_replicas or ?replicas=1 in the URL) or add \
                 JetStream servers"
            ),
        )
        .with_source(e)
    }

    fn check(&self, found: &StreamConfigIn, subjects: &[String]) -> Result<()> {
        let problem = if let Some(missing) = subjects.iter().find(|s| !found.subjects.contains(s)) {
            Some(format!("it does not capture {missing:?}"))
        } else if found.max_msgs_per_subject != 1 {
            Some(format!(
                "it keeps {} messages per subject instead of 1",
                found.max_msgs_per_subject
            ))
        } else if found.retention != "limits" {
            Some(format!(
                "its retention is {:?}, not limits",
                found.retention
            ))
        } else if found.deny_delete || found.sealed || found.mirror.is_some() {
            Some("it does not allow deleting messages".to_owned())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "nats: the existing stream {:?} cannot hold {}s: {problem}; delete it or \
                     choose another lease_stream (the claim stream is named after it)",
                    self.stream, self.holds
                ),
            )),
            None => Ok(()),
        }
    }
}
