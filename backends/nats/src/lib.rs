//! The NATS backend of bgtask: [`NatsBroker`], a [`Broker`] on a NATS server with JetStream.
//!
//! ```no_run
//! # async fn example() -> bgtask_core::Result<()> {
//! use std::time::Duration;
//! use bgtask_nats::{NatsBroker, NatsConfig};
//!
//! let broker = NatsBroker::connect("nats://127.0.0.1:4222").await?;
//! let tuned = NatsBroker::connect_with(
//!     NatsConfig::new("tls://app:secret@nats.internal:4222")
//!         .with_tls_root_certificate("/etc/nats/ca.pem")
//!         .with_op_timeout(Duration::from_secs(2)),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! It needs JetStream (`nats-server -js`) for the leases and claims, and works with
//! nats-server 2.9 and later (tested on 2.9.10).
//!
//! # URLs
//!
//! - `nats://host[:port]` (port 4222 by default);
//! - `nats://user:password@host` and `nats://token@host`, percent-encoded where needed;
//! - `tls://...` for TLS, with the platform's root certificates (`SSL_CERT_FILE` is honoured)
//!   or the ones in [`tls_root_certificates`](NatsConfig::tls_root_certificates), and an
//!   optional [client certificate](NatsConfig::tls_client_certificate);
//! - several servers of a cluster, comma-separated: `nats://a:4222,nats://b:4223,nats://c:4224`
//!   (see [Replicas and clusters](#replicas-and-clusters));
//! - one query parameter, `?replicas=N` (1 to 5), the replicas of the lease and claim streams
//!   ([`replicas`](NatsConfig::replicas)); any other parameter is a [`ErrorKind::Config`] error.
//!
//! Passwords and tokens never appear in `Debug` output or in error messages. Wrong credentials
//! fail [`connect`](NatsBroker::connect) at once with [`ErrorKind::Auth`]; a server that
//! refuses the connection or does not answer fails it with [`ErrorKind::Unavailable`].
//!
//! # Connection
//!
//! A broker holds one NATS connection (`async-nats`), shared by its clones and its
//! subscriptions. The client pings the server every [`connection.liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval)
//! (2 s; the NATS default is 2 minutes) and drops a connection that leaves three pings
//! unanswered, so a half-open connection is found within seconds. It reconnects forever: at
//! once, then after 50 ms doubling up to [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff) (each wait
//! jittered, [`bgtask_core::backoff`]), and
//! resubscribes every live subscription by itself. The connection closes when the last clone
//! and the last subscription are dropped, or at once with [`NatsBroker::close`].
//!
//! # Subjects
//!
//! Channel, lease key and claim key names are arbitrary UTF-8 (up to
//! [`subject::MAX_NAME_BYTES`], 2 KiB).
//! Each becomes a single subject token: the unpadded base64url encoding of its bytes (`_` for
//! the empty name) under a fixed prefix ([`subject_prefix`](NatsConfig::subject_prefix),
//! default `bgtask`):
//!
//! | what | subject |
//! |------|---------|
//! | channel `name` | `bgtask.ch.<base64url(name)>` |
//! | lease key `key` | `bgtask.lease.<base64url(key)>` (in the lease stream) |
//! | the lease clock | `bgtask.clock` (in the lease stream) |
//! | claim key `key` | `bgtask.claim.<base64url(key)>` (in the claim stream) |
//! | the claim clock | `bgtask.claimclock` (in the claim stream) |
//!
//! The token alphabet (`A-Z a-z 0-9 - _`) has no `.`, `*`, `>`, whitespace or `$`: a name
//! never acts as a wildcard, never splits into tokens, never reaches a `$SYS` or `$JS`
//! subject, and, the encoding being injective, two names never share a subject. A 2 KiB name
//! gives a 2731-byte token, well below the server's default `max_control_line` of 4 KiB.
//!
//! # Publish and subscribe
//!
//! [`publish`](Broker::publish) first checks that the client is connected (while it is not, a
//! message would sit in the client's queue, be sent late or be dropped) and fails with
//! [`ErrorKind::Unavailable`] when it is not. It then publishes and waits for a round trip
//! through the server ([`flush`](async_nats::Client::flush) only writes the socket): a probe
//! sent on the same connection to an inbox the broker subscribes to. The server handles a
//! connection's commands in order, so the probe's return proves the message was routed. NATS
//! cannot say how many subscribers received it: [`Published::Unknown`].
//!
//! [`subscribe`](Broker::subscribe) sends `SUB` and returns after the same round trip, so the
//! subscription is active on the server when it returns. (In a cluster, other servers learn of
//! it asynchronously, usually within a millisecond.) Dropping the subscription unsubscribes.
//!
//! The subscription yields [`Incoming::Gap`](bgtask_core::Incoming::Gap) after a reconnect, once
//! the server has the resubscriptions: an idle subscription when a round trip through the new
//! connection has come back (async-nats queues the resubscriptions first), a busy one before
//! the first message of the new connection at the latest. It also yields a gap when the client
//! dropped messages because
//! a subscription of this connection fell more than
//! [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer) messages behind (the client reports
//! that without saying which subscription, so every subscription of the connection yields a
//! gap).
//!
//! # Large payloads
//!
//! A NATS message carries at most the server's `max_payload` (1 MiB by default), read from the
//! server's `INFO` on every connection. A larger payload is split into chunks that fit, sent
//! back to back with a `Bgt-Chunk: <id> <index> <count> <total>` header (a random message id,
//! so chunks of concurrent publishers never mix), and reassembled by every subscription; a
//! subscription that misses a chunk drops the payload and yields a gap. Payloads up to
//! [`max_message_size`](NatsConfig::max_message_size) (64 MiB) are accepted; a larger one fails
//! with [`ErrorKind::TooLarge`] before anything is sent.
//!
//! # Leases
//!
//! The leases live in one JetStream stream, [`lease_stream`](NatsConfig::lease_stream) (default
//! `BGTASK_LEASES`), which the backend creates when it is missing, with its own JSON through
//! the JetStream API (async-nats' typed API cannot create streams or key-value buckets on
//! nats-server 2.9): file storage, [`replicas`](NatsConfig::replicas) replicas (see
//! [Replicas and clusters](#replicas-and-clusters)), subjects `<prefix>.lease.*` and `<prefix>.clock`,
//! **one message per subject** (`max_msgs_per_subject: 1`), and `max_age` =
//! [`lease_max_ttl`](NatsConfig::lease_max_ttl). An existing stream is used as it is if it
//! captures those subjects and keeps one message per subject (so it can be created beforehand,
//! with other limits), with the replicas it has.
//!
//! Each lease key has one subject, whose one message (the *record*) holds the key's whole lease
//! set as JSON: for each lease, its id, its note and its expiry. Every operation:
//!
//! 1. reads the record (`$JS.API.STREAM.MSG.GET`, `last_by_subj`) and, when there is one, the
//!    server's current time (below; read once per call, and kept for its retries);
//! 2. drops the leases whose expiry is not after that time;
//! 3. for `acquire`, refuses if `cap` live leases remain, else writes the new record with the
//!    new lease; for `release`, writes the record without the lease, or deletes it
//!    (`$JS.API.STREAM.MSG.DELETE` of exactly the sequence read) when none is left;
//! 4. writes only if nobody changed the record since it was read: the write carries
//!    `Nats-Expected-Last-Subject-Sequence: <sequence read>` (0 when there was none), and the
//!    server refuses it otherwise. A refused write starts again from 1 after a random wait
//!    (1 ms doubling up to 32 ms), within [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout).
//!
//! One shortcut: an `acquire` (with a cap of at least 1) on a key this broker did not last see
//! with a record skips step 1 and writes a record holding only the new lease, with
//! `Nats-Expected-Last-Subject-Sequence: 0`. That is right whenever the key has no record, which
//! is the common case (a key's last release deletes its record), and the server refuses it
//! otherwise; then the acquire goes through steps 1 to 4 as usual.
//!
//! [`admit`](Broker::admit), every keyed task's admission, reads the blacklist flag's record and
//! acquires the limit lease at once, so it waits one round trip instead of two; a lease taken for
//! a value found blacklisted is released before it returns (it exists for that moment only, and
//! every admission of that value is refused meanwhile). `admit_and_publish` and
//! `release_and_publish` are the provided compositions (`admit` then `publish`, `release` then
//! `publish`); a core NATS publish waits for no answer.
//!
//! So a key's lease set changes only through compare-and-set on its record: 100 concurrent
//! acquires with cap 5 yield exactly 5 leases, from any number of brokers.
//!
//! **The clock.** Expiry is judged by one clock, the JetStream server's, never by the
//! clients'. The server stamps every message it stores with its own time, and the backend
//! reads time only from those stamps:
//!
//! - *now* is the stamp of the message on `<prefix>.clock`, read right after the broker wrote
//!   one there (its own or a later one): the server's time at some instant during the call.
//!   One reading serves every operation of the broker that asked before it began (each still
//!   gets a time from within its own call), so concurrent releases and counts share it;
//! - a new lease is written as "expires `ttl` after this record's own stamp", since the stamp
//!   the server will give the write is not known before the write; later writes of the record
//!   store that expiry as an absolute server time.
//!
//! Clients' clocks are never compared with anything, so any skew between clients, or between a
//! client and the server, is tolerated. What does matter is the server's own clock: a step
//! backwards lengthens every lease by the step, a step forwards shortens them; in a cluster,
//! when the stream's leader moves to another server, leases shift by the skew between the two
//! servers' clocks. "now" is read before the write, so a lease that expires during
//! the call may still count as live (never the other way round): a cap is never exceeded.
//!
//! **What is stored, and for how long.** A record holds only its key's leases, and a release
//! that leaves none deletes it. A lease is only ever dropped by a read that finds it expired,
//! so a key whose leases all expire without a release keeps its record until the next
//! operation on the key deletes it, or until the stream's `max_age` removes it: nothing
//! outlives `max_age` (32 days by default, the protocol's longest task timeout with room for
//! margins; a longer lease fails with [`ErrorKind::InvalidInput`]). To free the space sooner:
//!
//! - on servers with per-message TTLs (2.11 and later, where the stream is created with
//!   `allow_msg_ttl`), every record carries a `Nats-TTL` of its longest lease plus one second,
//!   so the server deletes it when its leases are over;
//! - on older servers (2.9, 2.10 silently ignore per-message TTLs, so expiry never relies on
//!   them), each broker keeps a timer per record it wrote (at most 100,000) and deletes the
//!   record, if still unchanged and over, half a second after its longest lease. A record whose
//!   broker is gone by then stays until the next operation on its key or `max_age`.
//!
//! A record holds as many leases as fit in one message (about 10,000 with short notes at the
//! default 1 MiB `max_payload`); an acquire past that fails with [`ErrorKind::TooLarge`].
//!
//! # Claims
//!
//! [`claim`](Broker::claim), the protocol's first-accept-wins step (every worker that sees a
//! task claims it once; the creator claims it to abandon it), does not go through the lease
//! records above: claims live apart, in the *claim stream*, named after the lease stream with
//! `_CLAIMS` appended (default `BGTASK_LEASES_CLAIMS`; see [`NatsBroker::claim_stream`]), which
//! the backend creates like the lease stream: file storage, the same replicas, subjects
//! `<prefix>.claim.*` and `<prefix>.claimclock`, one message per subject, `max_age` =
//! [`lease_max_ttl`](NatsConfig::lease_max_ttl), and the same checks on an existing stream.
//! It is a stream of its own so that a lease stream created by an earlier version (or
//! beforehand, by hand) is used as it is. Its storage is file, like the lease stream's, so a
//! claim survives a server restart: a server that forgot claims would let a second worker take
//! a task that is already running.
//!
//! A key's claim is one message on its subject (the *record*), `{"v":1,"t":<ttl in ns>}`: the
//! claim is over `ttl` after the server's timestamp on the record. A claim:
//!
//! 1. publishes the record with `Nats-Expected-Last-Subject-Sequence: 0`, "only if the subject
//!    has no message". Stored: the claim is taken, in one round trip. This is the common case,
//!    since claim keys are task ids.
//! 2. Refused (`wrong last sequence`): somebody holds or held it. The backend reads the record
//!    (`$JS.API.STREAM.MSG.GET`, `last_by_subj`) and, at the same time, the server's clock
//!    (below). A record whose timestamp plus TTL is after that time is live: `false`.
//! 3. Otherwise the claim is over: the backend publishes its record with
//!    `Nats-Expected-Last-Subject-Sequence: <the sequence read>`, so of several brokers taking
//!    over the same record exactly one succeeds (the record replaces the old one, one message per
//!    subject); a refused takeover goes back to 2 (with a random wait from the third round on), a
//!    record deleted meanwhile back to 1.
//!
//! Losing claims, one per other worker and task, are made cheap within one broker (a process
//! whose workers share it) in two ways:
//!
//! - *One attempt per key at a time.* Claims on a key that come while an attempt on it is under
//!   way wait for it to end, and then share one attempt. It begins after each of them began and
//!   ends before each returns, so its outcome holds for each of them: `false` for all, or `true`
//!   for the first and `false` for the others, which come just after it.
//! - *Claims known to be live.* A broker remembers, per key, a server time until which the
//!   claim it took or found is surely live (for its own write: the latest server time it had
//!   read before sending, plus the TTL; for a record read: its timestamp plus its TTL; at most
//!   100,000 keys). A later claim on the key reads only the clock (shared, below): while the
//!   server's time is before the remembered one, the record is still there and still live (a
//!   record leaves only once it is over), so the answer is `false` without a request of its
//!   own; otherwise the claim goes to the server as above.
//!
//! **The clock** is the lease clock (the same shared reader) on the claim stream (whose timestamps are the ones
//! compared, also when the two streams are led by different servers of a cluster): a write on
//! `<prefix>.claimclock`, then a read of that subject's last timestamp. The reading is shared:
//! claims that need the time while a reading is under way wait for the next one, which starts
//! after they asked, so each gets a server time from within its own call, and many concurrent
//! losing claims cost one reading instead of two requests each. A claim reads the clock at most
//! once. Judging a record live against a time read during the call is never wrong (it was live
//! at that time, or it was written after it, during the call); judging it over lets a takeover
//! that the server applies later still. As for leases, only the server's own clock matters:
//! steps of it lengthen or shorten claims by the step, and in a cluster a move of the stream's
//! leader shifts them by the skew between the servers' clocks. The brokers' own clocks are
//! used only to plan when the sweeper (below) looks again, never to judge a claim.
//!
//! **What is stored, and for how long.** One record per claimed key (about 250 bytes with its
//! subject and headers for a task's claim key), and the clock's one message. A record goes
//! when:
//!
//! - a takeover replaces it (one message per subject);
//! - on servers with per-message TTLs (2.11+), the server deletes it one second (rounded up to
//!   whole seconds) after its claim is over (`Nats-TTL`);
//! - on older servers (2.9, 2.10), the broker that wrote it deletes it
//!   (`$JS.API.STREAM.MSG.DELETE` of exactly that sequence, so a newer record is never
//!   deleted) within about a second after its claim is over, judged by the server's clock: a
//!   clock reading that starts after the write was acknowledged bounds the record's timestamp,
//!   and the record is deleted once a later reading is at least that bound plus the TTL. The
//!   sweeper reads the clock at most every 50 ms, and watches at most 1,000,000 records per
//!   broker (16 bytes each);
//! - otherwise (its broker was closed, dropped or crashed first, or watched too many), the
//!   stream's `max_age` removes it: [`lease_max_ttl`](NatsConfig::lease_max_ttl), 32 days by
//!   default. A claim longer than that fails with [`ErrorKind::InvalidInput`].
//!
//! All the brokers of a namespace must claim the same way: a version of this crate that claims
//! through lease records (before the claim stream) does not see claims in the claim stream.
//!
//! # Replicas and clusters
//!
//! Give every server of the cluster you know in the URL (`nats://a:4222,nats://b:4223,...`):
//! the client connects to one of them (in random order), learns the others from its `INFO`
//! (`connect_urls`), and, when its server dies or stops answering (three pings left
//! unanswered, see [Connection](#connection)), reconnects to another one by itself; the
//! subscriptions come back with a gap as after any reconnect. Calls made while it reconnects
//! fail with [`ErrorKind::Unavailable`] within their bound.
//!
//! **Replicas.** The lease and claim streams are created with
//! [`replicas`](NatsConfig::replicas) replicas (`with_replicas(n)` or `?replicas=n` in the
//! URL, 1 to 5). The default is [`CLUSTER_REPLICAS`] (3) when the server the broker connects
//! to is in a cluster (its `INFO` names one) that lists at least 3 servers, and the server is
//! [`MIN_REPLICATED_SERVER`] (2.10.19) or later; else 1.
//!
//! The version matters: before it, JetStream did not keep compare-and-set writes exclusive on a
//! replicated stream. Several concurrent writes expecting the same last sequence of a subject
//! could all be stored (the check was a pre-check on the stream leader, outside the Raft
//! proposal: nats-server#4320, fixed in 2.9.21; "expect no message" writes, #5794, fixed in
//! 2.10.19). The leases and claims rely on exactly that check, so on such a server a replicated
//! stream would let two workers claim one task and let a per-key limit be exceeded (measured
//! here on a 3-node 2.9.10 cluster with 3 replicas: the conformance suite's cap scenarios
//! granted 7 to 48 leases where the cap allowed 5; with 1 replica, exact in every run). So, on
//! a server before 2.10.19:
//!
//! - the default is 1 replica even in a cluster (with a warning in the log);
//! - asking for more than 1 fails [`connect`](NatsBroker::connect) with [`ErrorKind::Config`],
//!   naming the server version and the fix;
//! - an existing lease or claim stream with more than 1 replica is refused the same way.
//!
//! With 1 replica in a cluster, the streams live on one server (JetStream picks it): when that
//! server is down, leases, claims and so task admission fail with [`ErrorKind::Unavailable`]
//! until it is back (its file store keeps them across a restart); publish and subscribe keep
//! working through the other servers. With 3 replicas (2.10.19+), they survive the loss of
//! one server, after JetStream elects a new stream leader: about 6 s without leases and claims
//! when the leader was killed, measured on a 3-node nats-server 2.15.1 cluster (where the whole
//! conformance suite ran with 3 replicas; see docs/reliability.md).
//!
//! On a clustered stream, a server with the fix of nats-server#4320 refuses a compare-and-set
//! write while another one on the same subject is still in flight (`wrong last sequence`,
//! err_code 10164, without the sequence): the backend treats it as the conflict it is and
//! starts the operation again, as for any lost compare-and-set.
//!
//! Creating a stream with more replicas than the cluster can place (fewer JetStream servers
//! than replicas, or some of them down) fails with [`ErrorKind::Config`] naming the stream,
//! the replicas, the servers the cluster reported and the fix. An existing stream is used with
//! the replicas it has (a warning is logged when they differ from the setting): change them
//! with the JetStream API (`nats stream edit --replicas`), never silently from here.
//! [`NatsBroker::stream_replicas`] says what the broker found.
//!
//! **Read after write.** Every lease and claim read (`$JS.API.STREAM.MSG.GET`, never the
//! "direct get" API, and the backend does not set `allow_direct`) and every write goes
//! through the stream's leader, which answers a write once it is stored (on a majority of the
//! replicas); so a read that starts after a write was acknowledged sees it, from any broker
//! and through any server of the cluster. The clock reading (see [Leases](#leases)) is a write
//! then a read on the same stream, so it is the leader's clock; when the leader moves, leases
//! shift by the skew between the two servers' clocks.
//!
//! **Channels.** Publish and subscribe are core NATS: a message is routed to the
//! subscriptions on every server of the cluster. [`subscribe`](Broker::subscribe) returns once
//! the broker's own server has the subscription; the other servers learn of it
//! asynchronously (usually within a millisecond), so a message published through another
//! server right after `subscribe` returns may miss it. The protocol rarely meets that race: a
//! creator offers a task to a worker only after hearing of its presence, which the worker
//! announces after subscribing (when it comes on the presence channel, it follows the
//! subscription on the same route; read from the lease stream, it gives no such order). The
//! suite's `subscription_is_active_on_return`, which publishes from a second broker at once,
//! lost one message of 20 in 2 of 7 runs on a 3-node 2.15.1 cluster and once in a full test
//! run on 2.9.10, with the brokers spread over the nodes (the cluster tests now put a
//! scenario's brokers on one node). A cluster-wide subscription barrier is not built yet.
//!
//! **Hung nodes.** A node that hangs with its sockets open (a stopped VM, a long stall) is left
//! by the brokers after three unanswered pings. The servers need the same: with their default
//! pings (every 2 minutes) the other nodes keep their routes to a hung node for minutes, and in
//! the cluster fault tests its return stalled the task traffic for about 6 s in 2 runs of 3;
//! with `ping_interval: "1s"`, `ping_max: 3` and `write_deadline: "2s"` on the servers (as
//! `scripts/nats-cluster` runs them) it cost at most 2 s at about 60 % in 4 runs
//! (docs/reliability.md).
//!
//! `scripts/nats-cluster up` starts a local 3-node cluster (from the installed `nats-server`,
//! on free loopback ports) and prints its URL; see the README.
//!
//! # Time bounds
//!
//! Every operation finishes within [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout): publish (including
//! its round trip), subscribe (including its round trip), and each lease and claim call
//! (including every retry, the clock, and a claim's wait for an attempt on its key under way).
//! An operation while the client is disconnected fails at once; one that exceeds its bound
//! fails with [`ErrorKind::Unavailable`], never as a hang and never as a success. A publish or
//! lease or claim write reported as failed may still have reached the server (it is never
//! retried, so it is delivered at most once; an acquire or claim that timed out after its
//! write leaves a lease or claim nobody holds, which expires with its TTL).
//! [`NatsBroker::connect`] waits at most [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout) per
//! server named in the URL, plus `connect_timeout` to set up the lease and claim streams.
//!
//! # Configuration
//!
//! | field | default | meaning |
//! |-------|---------|---------|
//! | [`url`](NatsConfig::url) | — | where the server is (see above) |
//! | [`connection.op_timeout`](bgtask_core::ConnectionSettings::op_timeout) | 5 s | bound on every operation |
//! | [`connection.connect_timeout`](bgtask_core::ConnectionSettings::connect_timeout) | 5 s | bound on one connection attempt |
//! | [`connection.liveness_interval`](bgtask_core::ConnectionSettings::liveness_interval) | 2 s | how often the client pings the server |
//! | [`connection.max_backoff`](bgtask_core::ConnectionSettings::max_backoff) | 2 s | longest wait between reconnection attempts |
//! | [`connection.subscription_buffer`](bgtask_core::ConnectionSettings::subscription_buffer) | 65536 | messages buffered per subscription |
//! | [`connection.subscription_buffer_bytes`](bgtask_core::ConnectionSettings::subscription_buffer_bytes) | 64 MiB | not applied: async-nats counts messages only, so a subscription holds at most `subscription_buffer` × the server's `max_payload` |
//! | [`subject_prefix`](NatsConfig::subject_prefix) | `bgtask` | first token of every subject |
//! | [`lease_stream`](NatsConfig::lease_stream) | `BGTASK_LEASES` | the JetStream stream of the leases; the claims' is `<lease_stream>_CLAIMS` |
//! | [`lease_max_ttl`](NatsConfig::lease_max_ttl) | 32 days | longest lease and claim; the streams' `max_age` |
//! | [`replicas`](NatsConfig::replicas) | 3 in a cluster of 3+ on 2.10.19+, else 1 | replicas of the lease and claim streams (`?replicas=N`) |
//! | [`max_message_size`](NatsConfig::max_message_size) | 64 MiB | largest payload `publish` carries |
//! | [`tls_root_certificates`](NatsConfig::tls_root_certificates) | none | CA files for `tls://` |
//! | [`tls_client_certificate`](NatsConfig::tls_client_certificate) | none | client certificate and key |
//!
//! # Tests
//!
//! The integration tests need NATS with JetStream at `BGTASK_NATS_URL` (default
//! `nats://127.0.0.1:4222`; `docker compose up -d nats`, or `nats-server -js`) and fail when
//! there is none. They use random names and never purge or reconfigure the server; they create
//! the default lease and claim streams if they are missing. Tests of authentication, TLS and server restarts
//! start private `nats-server`s (the binary must be on `PATH`) on free ports.
//!
//! `tests/cluster.rs` runs the whole conformance suite, and the replica settings, on the
//! cluster at `BGTASK_NATS_CLUSTER_URL` (no default: it fails when unset, saying to run
//! `export BGTASK_NATS_CLUSTER_URL=$(scripts/nats-cluster up)`; `scripts/test` does that).
//! `tests/cluster_faults.rs` starts private clusters with the same script and kills or stops
//! their nodes under load.
#![deny(missing_docs)]

mod broker;
mod chunk;
mod claim;
mod clock;
mod config;
mod conn;
mod connect;
mod error;
mod js;
mod lease;
mod stream;
mod sub;
pub mod subject;
mod time;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bgtask_core::Result;

pub use config::{
    NatsConfig, CLUSTER_REPLICAS, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LEASE_MAX_TTL,
    DEFAULT_LEASE_STREAM, DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_OP_TIMEOUT, DEFAULT_PORT, DEFAULT_SUBJECT_PREFIX, DEFAULT_SUBSCRIPTION_BUFFER,
    MAX_REPLICAS, MIN_REPLICATED_SERVER,
};

use claim::Claims;
use conn::{Barrier, Lifeline, Shared};
use error::{closed, no_answer};
use lease::Leases;
use subject::Subjects;

// Named by the docs' links only: the code that uses them is in `broker.rs` and `connect.rs`.
#[cfg(doc)]
use bgtask_core::{Broker, ErrorKind, Published};

/// A [`Broker`] on a NATS server with JetStream. Cheap to clone; clones share the connection.
///
/// See the [crate docs](crate) for subjects, chunking, leases, claims and time bounds.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: NatsConfig,
    client: async_nats::Client,
    shared: Arc<Shared>,
    barrier: Arc<Barrier>,
    /// Shared with the subscriptions: keeps the reconnect watcher running.
    lifeline: Arc<Lifeline>,
    subjects: Subjects,
    leases: Leases,
    claims: Claims,
    server_version: String,
}

impl NatsBroker {
    /// The settings this broker was built with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The largest message the server accepts (`max_payload` from its `INFO`); larger payloads
    /// are sent in chunks.
    pub fn server_max_payload(&self) -> usize {
        self.inner.client.max_payload()
    }

    /// The server's version, from its `INFO` when the broker connected.
    pub fn server_version(&self) -> &str {
        &self.inner.server_version
    }

    /// The longest lease [`acquire`](Broker::acquire) accepts: the smaller of
    /// [`lease_max_ttl`](NatsConfig::lease_max_ttl) and the lease stream's `max_age`.
    pub fn lease_max_ttl(&self) -> Duration {
        self.inner.leases.max_ttl()
    }

    /// The replicas of the lease stream and of the claim stream, as the server reported them
    /// when the broker connected (see [Replicas](crate#replicas-and-clusters)).
    pub fn stream_replicas(&self) -> (u32, u32) {
        (self.inner.leases.replicas(), self.inner.claims.replicas())
    }

    /// Whether the server keeps compare-and-set writes exclusive on replicated streams
    /// (version [`MIN_REPLICATED_SERVER`] or later), so the lease and claim streams may have
    /// more than one replica (see [Replicas](crate#replicas-and-clusters)).
    pub fn replicated_streams_supported(&self) -> bool {
        js::keeps_replicated_cas(&self.inner.server_version)
    }

    /// Whether lease records carry a per-message TTL, so the server deletes them when their
    /// leases are over (servers 2.11 and later).
    pub fn lease_records_expire(&self) -> bool {
        self.inner.leases.message_ttl()
    }

    /// The JetStream stream that holds the claims: [`lease_stream`](NatsConfig::lease_stream)
    /// followed by `_CLAIMS` (see [Claims](crate#claims)).
    pub fn claim_stream(&self) -> &str {
        self.inner.claims.stream()
    }

    /// Close the broker and every clone of it now: every subscription stream ends, later calls
    /// fail with [`ErrorKind::Closed`], and the connection is drained and closed.
    pub fn close(&self) {
        self.inner.shared.close();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.inner.client.clone();
            runtime.spawn(async move {
                let _ = client.drain().await;
            });
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    fn check_open(&self, what: &str) -> Result<()> {
        if self.is_closed() {
            return Err(closed(what));
        }
        Ok(())
    }

    /// Run `work` within `op_timeout`.
    async fn bounded<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let bound = self.inner.config.connection.op_timeout;
        match tokio::time::timeout(bound, work).await {
            Ok(result) => result,
            Err(_) => Err(no_answer(what, bound)),
        }
    }
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("url", &self.inner.config.redacted_url())
            .field("server_version", &self.inner.server_version)
            .field("server_max_payload", &self.server_max_payload())
            .field("connection", &self.inner.client.connection_state())
            .field("op_timeout", &self.inner.config.connection.op_timeout)
            .field("lease_stream", &self.inner.config.lease_stream)
            .field("claim_stream", &self.claim_stream())
            .field("closed", &self.is_closed())
            .finish()
    }
}
