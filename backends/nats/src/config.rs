//! [`NatsConfig`]: where the server is, how to authenticate, and how long to wait for it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};

pub use bgtask_core::connection::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS_INTERVAL, DEFAULT_MAX_BACKOFF, DEFAULT_OP_TIMEOUT,
    DEFAULT_SUBSCRIPTION_BUFFER,
};
use bgtask_core::ConnectionSettings;

/// The default first token of every subject the backend uses: [`NatsConfig::subject_prefix`].
pub const DEFAULT_SUBJECT_PREFIX: &str = "bgtask";
/// The default name of the JetStream stream that holds the leases: [`NatsConfig::lease_stream`].
pub const DEFAULT_LEASE_STREAM: &str = "BGTASK_LEASES";
/// The default longest lease, and the lease stream's `max_age`: [`NatsConfig::lease_max_ttl`].
/// 32 days: the protocol's longest task timeout (30 days) with room for its margins.
pub const DEFAULT_LEASE_MAX_TTL: Duration = Duration::from_secs(32 * 24 * 60 * 60);
/// The default largest payload [`publish`](bgtask_core::Broker::publish) carries, split into
/// chunks where the server's `max_payload` is smaller: [`NatsConfig::max_message_size`].
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The most replicas a JetStream stream can have.
pub const MAX_REPLICAS: u32 = 5;

/// The replicas of the lease and claim streams when the server is in a cluster of at least this
/// many servers and [`NatsConfig::replicas`] is not set.
pub const CLUSTER_REPLICAS: u32 = 3;

/// The oldest nats-server that keeps compare-and-set writes exclusive on a replicated stream,
/// which the leases and claims rely on: before it, concurrent writes expecting the same last
/// sequence of a subject could all succeed on a stream with more than one replica
/// (nats-server#4320, fixed in 2.9.21; #5794, "expect no message" writes, fixed in 2.10.19).
pub const MIN_REPLICATED_SERVER: (u32, u32, u32) = (2, 10, 19);

/// The port of a URL that names none.
pub const DEFAULT_PORT: u16 = 4222;

/// How to reach NATS and how long to wait for it.
///
/// Build one with [`NatsConfig::new`] and adjust it with the `with_*` methods (or set the public
/// fields), then pass it to [`NatsBroker::connect_with`](crate::NatsBroker::connect_with).
///
/// Its `Debug` output never shows a password or token.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server's URL: `nats://[user:password@|token@]host[:port]`, or `tls://...` for TLS
    /// (port 4222 when none is given). Several servers of one cluster may be given, separated by
    /// commas (`nats://a:4222,nats://b:4222`); credentials may then appear in any of them but
    /// must be the same wherever they do. User, password and token are percent-decoded.
    /// The one query parameter is `replicas=N` (see [`replicas`](Self::replicas)), e.g.
    /// `nats://a:4222,nats://b:4222,nats://c:4222?replicas=3`; any other is an error.
    pub url: String,
    /// How long to wait for the server, how often the client pings it (three pings left
    /// unanswered drop the connection, which is then re-established; the NATS clients' own
    /// default is two minutes), how to back off while reconnecting (the first attempt is
    /// immediate), how much a subscription buffers (past it the client drops messages and the
    /// subscription yields a gap). Every default as in [`ConnectionSettings`]; the `with_*`
    /// setters set them. [`connect`](crate::NatsBroker::connect) also sets up the lease stream
    /// within `connect_timeout`.
    pub connection: ConnectionSettings,
    /// The first token of every subject: channels are `<prefix>.ch.<name>`, lease keys
    /// `<prefix>.lease.<key>`, the lease clock `<prefix>.clock`, claim keys
    /// `<prefix>.claim.<key>` and the claim clock `<prefix>.claimclock`. One to 64 ASCII
    /// letters, digits, `_` or `-`. Default `bgtask`.
    pub subject_prefix: String,
    /// The JetStream stream that holds the leases, created when missing. The claims are held
    /// in a stream named after it, `<lease_stream>_CLAIMS`, also created when missing. One to
    /// 64 ASCII letters, digits, `_` or `-`. Default `BGTASK_LEASES`.
    pub lease_stream: String,
    /// The longest lease [`acquire`](bgtask_core::Broker::acquire) and the longest claim
    /// [`claim`](bgtask_core::Broker::claim) accept, and the `max_age` of the lease and claim
    /// streams when the backend creates them: nothing the backend stores survives longer. When
    /// a stream already exists with a shorter `max_age`, that is the limit for its calls.
    /// Default 32 days (the protocol's longest task timeout, 30 days, with room for margins).
    pub lease_max_ttl: Duration,
    /// How many replicas the lease and claim streams are created with (1 to 5). `None` (the
    /// default) picks [`CLUSTER_REPLICAS`] (3) when the server the broker connects to is in a
    /// cluster of at least 3 servers (its `INFO` names a cluster and lists at least 3 client
    /// URLs) and is [`MIN_REPLICATED_SERVER`] (2.10.19) or later, else 1. A `replicas=N` query
    /// parameter in the [`url`](Self::url) sets it too.
    ///
    /// More than 1 on an older server fails with [`ErrorKind::Config`]: before 2.10.19, JetStream
    /// did not keep compare-and-set writes exclusive on a replicated stream (nats-server#4320),
    /// which the leases and claims rely on; an existing lease or claim stream with replicas is
    /// refused there for the same reason. Creating a stream with more replicas than the cluster
    /// can place fails with [`ErrorKind::Config`] naming the problem. An existing stream is
    /// otherwise used with the replicas it has (a warning is logged when they differ from this
    /// setting): change them with the JetStream API (`nats stream edit --replicas`), never
    /// silently from here. See the crate docs, "Replicas and clusters".
    pub replicas: Option<u32>,
    /// The largest payload [`publish`](bgtask_core::Broker::publish) carries; a larger one
    /// fails with [`ErrorKind::TooLarge`]. Payloads larger than the server's `max_payload`
    /// travel in chunks, which subscribers reassemble, so this may exceed it. Default 64 MiB.
    pub max_message_size: usize,
    /// PEM files of certificate authorities to trust for `tls://` instead of the platform's
    /// root certificates (which honour `SSL_CERT_FILE`). Default none.
    pub tls_root_certificates: Vec<PathBuf>,
    /// A client certificate and its private key (PEM files), for servers that verify clients.
    /// Default none.
    pub tls_client_certificate: Option<(PathBuf, PathBuf)>,
}

impl NatsConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            connection: ConnectionSettings::default(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_owned(),
            lease_stream: DEFAULT_LEASE_STREAM.to_owned(),
            lease_max_ttl: DEFAULT_LEASE_MAX_TTL,
            replicas: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            tls_root_certificates: Vec::new(),
            tls_client_certificate: None,
        }
    }

    /// Set [`subject_prefix`](Self::subject_prefix).
    pub fn with_subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Set [`lease_stream`](Self::lease_stream).
    pub fn with_lease_stream(mut self, stream: impl Into<String>) -> Self {
        self.lease_stream = stream.into();
        self
    }

    /// Set [`lease_max_ttl`](Self::lease_max_ttl).
    pub fn with_lease_max_ttl(mut self, ttl: Duration) -> Self {
        self.lease_max_ttl = ttl;
        self
    }

    /// Set [`replicas`](Self::replicas): the lease and claim streams are created with `n`
    /// replicas (1 to 5).
    pub fn with_replicas(mut self, n: u32) -> Self {
        self.replicas = Some(n);
        self
    }

    /// Set [`max_message_size`](Self::max_message_size).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Add a PEM file of certificate authorities to
    /// [`tls_root_certificates`](Self::tls_root_certificates).
    pub fn with_tls_root_certificate(mut self, pem: impl Into<PathBuf>) -> Self {
        self.tls_root_certificates.push(pem.into());
        self
    }

    /// Set [`tls_client_certificate`](Self::tls_client_certificate).
    pub fn with_tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// The URL with every password and token replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Check that every value is usable.
    pub(crate) fn validate(&self) -> Result<()> {
        self.connection.validate("nats")?;
        if self.lease_max_ttl < Duration::from_secs(1) {
            return Err(config_error("lease_max_ttl must be at least 1 s"));
        }
        if let Some(problem) = self.replicas.and_then(replicas_problem) {
            return Err(config_error(problem));
        }
        let in_url = self.target()?.replicas;
        if let (Some(set), Some(url)) = (self.replicas, in_url) {
            if set != url {
                return Err(config_error(format!(
                    "replicas is {set} but the URL says replicas={url}; give it once"
                )));
            }
        }
        if self.max_message_size == 0 {
            return Err(config_error("max_message_size must be at least 1"));
        }
        for (name, value) in [
            ("subject_prefix", &self.subject_prefix),
            ("lease_stream", &self.lease_stream),
        ] {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(config_error(format!(
                    "{name} {value:?} must be 1 to 64 ASCII letters, digits, '_' or '-'"
                )));
            }
        }
        Ok(())
    }

    /// The stream that holds the claims: the lease stream's name followed by `_CLAIMS`.
    pub(crate) fn claim_stream(&self) -> String {
        format!("{}_CLAIMS", self.lease_stream)
    }

    /// The replicas asked for: [`replicas`](Self::replicas), else the URL's `replicas=N`.
    pub(crate) fn asked_replicas(&self) -> Result<Option<u32>> {
        Ok(self.replicas.or(self.target()?.replicas))
    }

    /// The servers to connect to and the credentials, from [`url`](Self::url).
    pub(crate) fn target(&self) -> Result<Target> {
        parse_urls(&self.url)
    }
}

bgtask_core::connection_setters!(NatsConfig);

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.redacted_url())
            .field("connection", &self.connection)
            .field("subject_prefix", &self.subject_prefix)
            .field("lease_stream", &self.lease_stream)
            .field("lease_max_ttl", &self.lease_max_ttl)
            .field("replicas", &self.replicas)
            .field("max_message_size", &self.max_message_size)
            .field("tls_root_certificates", &self.tls_root_certificates)
            .field("tls_client_certificate", &self.tls_client_certificate)
            .finish()
    }
}

/// What is wrong with `n` replicas, if anything.
fn replicas_problem(n: u32) -> Option<String> {
    (n == 0 || n > MAX_REPLICAS)
        .then(|| format!("replicas must be 1 to {MAX_REPLICAS} (JetStream's limit), not {n}"))
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, format!("nats: {}", message.into()))
}

/// Credentials found in a URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    None,
    UserPassword(String, String),
    Token(String),
}

/// What [`NatsConfig::url`] names: servers without credentials, the credentials, and whether
/// TLS is required.
pub(crate) struct Target {
    /// `nats://host:port` or `tls://host:port`, credentials removed.
    pub(crate) servers: Vec<String>,
    pub(crate) credentials: Credentials,
    pub(crate) tls: bool,
    /// `replicas=N` from the query.
    pub(crate) replicas: Option<u32>,
}

fn parse_urls(urls: &str) -> Result<Target> {
    let mut servers = Vec::new();
    let mut credentials = Credentials::None;
    let mut tls = false;
    let mut replicas = None;
    for one in urls.split(',').map(str::trim) {
        let shown = redact(one);
        let bad = |why: &str| config_error(format!("{shown:?} is not a usable NATS URL: {why}"));
        let parsed = url::Url::parse(one).map_err(|_| bad("expected nats://host[:port]"))?;
        let scheme = parsed.scheme().to_ascii_lowercase();
        match scheme.as_str() {
            "nats" => {}
            "tls" => tls = true,
            other => {
                return Err(bad(&format!(
                    "the scheme {other:?} is not nats:// or tls://"
                )))
            }
        }
        let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
        if parsed.path() != "" && parsed.path() != "/" {
            return Err(bad("a path is not allowed"));
        }
        for (name, value) in parsed.query_pairs() {
            if name != "replicas" {
                return Err(bad(&format!(
                    "unknown parameter {name:?} (the one parameter is replicas=N)"
                )));
            }
            let n: u32 = value
                .parse()
                .map_err(|_| bad(&format!("replicas={value:?} is not a number")))?;
            if let Some(problem) = replicas_problem(n) {
                return Err(bad(&problem));
            }
            if replicas.is_some_and(|r| r != n) {
                return Err(bad("the servers name different replicas"));
            }
            replicas = Some(n);
        }
        let port = parsed.port().unwrap_or(DEFAULT_PORT);
        let user = percent_decode(parsed.username()).ok_or_else(|| bad("bad user"))?;
        let found = match parsed.password() {
            Some(password) => Credentials::UserPassword(
                user,
                percent_decode(password).ok_or_else(|| bad("bad password"))?,
            ),
            None if !user.is_empty() => Credentials::Token(user),
            None => Credentials::None,
        };
        if found != Credentials::None {
            if credentials != Credentials::None && credentials != found {
                return Err(bad("the servers name different credentials"));
            }
            credentials = found;
        }
        servers.push(format!("{scheme}://{host}:{port}"));
    }
    Ok(Target {
        servers,
        credentials,
        tls,
        replicas,
    })
}

/// `%XX` escapes decoded, as UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `url` (one or several, comma-separated) without secrets: a password and a token (a user
/// without a password) become `***`. A URL that does not parse is not shown at all, since its
/// secret cannot be located reliably.
pub(crate) fn redact(url: &str) -> String {
    let secrets = bgtask_core::connection::Secrets {
        query: &[],
        bare_user: true,
    };
    url.split(',')
        .map(|one| bgtask_core::connection::redact_url(one.trim(), &secrets))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_tokens() {
        assert_eq!(
            redact("nats://user:s3cret@host:4222"),
            "nats://user:***@host:4222"
        );
        assert_eq!(redact("nats://s3cret@host:4222"), "nats://***@host:4222");
        assert_eq!(redact("tls://host"), "tls://host");
        let two = redact("nats://a:1,nats://u:s3cret@b:2");
        assert!(!two.contains("s3cret"), "{two}");
        assert!(two.contains("nats://a:1"), "{two}");
        assert_eq!(redact("nats://s3cret@[bad"), "<unparsable url>");
    }

    #[test]
    fn debug_hides_secrets() {
        for url in ["nats://u:hunter2@localhost", "nats://hunter2@localhost"] {
            let shown = format!("{:?}", NatsConfig::new(url));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn parses_credentials_and_servers() {
        let t = parse_urls("nats://us%40r:p%3Ass@h").unwrap();
        assert_eq!(t.servers, ["nats://h:4222"]);
        assert!(t.credentials == Credentials::UserPassword("us@r".into(), "p:ss".into()));
        assert!(!t.tls);
        let t = parse_urls("tls://tok@h:1").unwrap();
        assert_eq!(t.servers, ["tls://h:1"]);
        assert!(t.credentials == Credentials::Token("tok".into()));
        assert!(t.tls);
        let t = parse_urls("nats://a:1, nats://u:p@b:2").unwrap();
        assert_eq!(t.servers, ["nats://a:1", "nats://b:2"]);
        assert!(t.credentials == Credentials::UserPassword("u".into(), "p".into()));
        for bad in [
            "redis://h",
            "nats://",
            "h:4222",
            "nats://h/path",
            "nats://a:b@h,nats://c:d@h",
            "nats://h?replicas=0",
            "nats://h?replicas=6",
            "nats://h?replicas=three",
            "nats://h?replica=3",
            "nats://a?replicas=1,nats://b?replicas=3",
        ] {
            let err = parse_urls(bad).err().unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
        }
        let t = parse_urls("nats://a:1,nats://b:2?replicas=3").unwrap();
        assert_eq!(t.servers, ["nats://a:1", "nats://b:2"]);
        assert_eq!(t.replicas, Some(3));
        assert_eq!(parse_urls("nats://a").unwrap().replicas, None);
        let err = parse_urls("nats://h?replicas=9").err().unwrap();
        assert!(err.to_string().contains("replicas must be 1 to 5"), "{err}");
        let err = parse_urls("redis://u:s3cret@h").err().unwrap();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn rejects_unusable_values() {
        let ok = NatsConfig::new("nats://localhost");
        assert!(ok.validate().is_ok());
        for bad in [
            ok.clone().with_op_timeout(Duration::ZERO),
            ok.clone().with_subscription_buffer(0),
            ok.clone().with_subject_prefix("a.b"),
            ok.clone().with_subject_prefix("$SYS"),
            ok.clone().with_lease_stream("a b"),
            ok.clone().with_lease_max_ttl(Duration::from_millis(10)),
            ok.clone().with_max_message_size(0),
            ok.clone().with_replicas(0),
            ok.clone().with_replicas(7),
            NatsConfig::new("nats://h?replicas=3").with_replicas(1),
        ] {
            assert_eq!(bad.validate().unwrap_err().kind(), ErrorKind::Config);
        }
    }
}
