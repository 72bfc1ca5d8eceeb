//! Redis Cluster: the `redis+cluster://` URL, the cluster client, and what a cluster needs that
//! one server does not (the masters to scan, the slot of a key).

use std::time::Duration;

use bgtask_core::{Error, ErrorKind, Result};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{ProtocolVersion, Value};
use url::Url;

use crate::config::{redact, RedisConfig};

/// The scheme of a Redis Cluster URL, and its TLS form.
pub(crate) const SCHEME: &str = "redis+cluster";
/// The TLS form of [`SCHEME`].
pub(crate) const TLS_SCHEME: &str = "rediss+cluster";

/// Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`).
pub(crate) fn is_cluster_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    scheme.eq_ignore_ascii_case(SCHEME) || scheme.eq_ignore_ascii_case(TLS_SCHEME)
}

/// The seed nodes of a cluster URL, each as a plain `redis://` (or `rediss://`) URL carrying the
/// URL's credentials.
///
/// `redis+cluster://[user[:password]@]host:port[,host:port...][/0]`: at least one node, every
/// node with its port; no database but 0 (a cluster has only that one); no query.
pub(crate) fn seed_nodes(url: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Config,
            format!("not a usable redis cluster URL ({why}): {}", redact(url)),
        )
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let node_scheme = if scheme.eq_ignore_ascii_case(SCHEME) {
        "redis"
    } else if scheme.eq_ignore_ascii_case(TLS_SCHEME) {
        "rediss"
    } else {
        return Err(bad("the scheme is not redis+cluster or rediss+cluster"));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if !matches!(path, "" | "/" | "/0") {
        return Err(bad(
            "a cluster has database 0 only, and the URL takes no query",
        ));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err(bad("an empty node"));
        }
        let node = match userinfo {
            Some(userinfo) => format!("{node_scheme}://{userinfo}@{host}"),
            None => format!("{node_scheme}://{host}"),
        };
        let parsed = Url::parse(&node).map_err(|_| bad("a node is not host:port"))?;
        if parsed.host_str().is_none_or(str::is_empty) || parsed.port().is_none() {
            return Err(bad("every node needs host:port"));
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// The cluster client of `config` (RESP3, for sharded pub/sub): `push` receives the pushes of
/// the connections it opens (the subscription connection passes one; the command connection
/// none).
pub(crate) fn client(
    config: &RedisConfig,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient> {
    let nodes = seed_nodes(&config.url)?;
    let mut builder = ClusterClientBuilder::new(nodes)
        .use_protocol(ProtocolVersion::RESP3)
        // Half the broker's bound on a connection per node, so that a fresh cluster connection
        // does not wait out a silent node: it is up, without that node, within the bound.
        .connection_timeout((config.connection.connect_timeout / 2).max(Duration::from_millis(50)))
        // Each try on a node waits at most half the operation's bound, so a silent (paused,
        // black-holed) node fails a try, and the client refreshes the slots and tries where
        // the slot lives now, within the operation's bound; the whole operation is bounded by
        // the broker (`op_timeout`), not by the client.
        .response_timeout((config.connection.op_timeout / 2).max(Duration::from_millis(50)))
        .overall_response_timeout(None)
        // Redirections (MOVED, ASK) and a failover's TRYAGAIN / CLUSTERDOWN are retried by the
        // client within the operation's own bound (`op_timeout`), waiting at most this long
        // between tries.
        .max_retry_wait(millis(config.connection.max_backoff))
        .min_retry_wait(10);
    if let Some(push) = push {
        builder = builder.push_sender(push);
    }
    builder.build().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("not a usable redis cluster URL: {}", config.redacted_url()),
        )
        .with_source(e)
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the Redis keys `a` and `b` hash to one slot (so one script or transaction may use
/// both).
pub(crate) fn same_slot(a: &[u8], b: &[u8]) -> bool {
    Slot::for_key(a) == Slot::for_key(b)
}

/// The addresses (host, port) of the cluster's masters, from `CLUSTER SHARDS` (Redis 7).
pub(crate) async fn masters(
    conn: &mut ClusterConnection,
) -> redis::RedisResult<Vec<(String, u16)>> {
    let shards: Value = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SHARDS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let mut found = Vec::new();
    for shard in as_list(&shards) {
        let Some(nodes) = field(shard, "nodes") else {
            continue;
        };
        for node in as_list(nodes) {
            let text = |name: &str| field(node, name).and_then(as_text);
            let port = field(node, "port").and_then(|v| match v {
                Value::Int(port) => u16::try_from(*port).ok(),
                _ => None,
            });
            if text("role").as_deref() == Some("master")
                && text("health").as_deref() == Some("online")
            {
                if let (Some(ip), Some(port)) = (text("ip"), port) {
                    found.push((ip, port));
                }
            }
        }
    }
    Ok(found)
}

/// A route to the node at `host:port`.
pub(crate) fn node(host: &str, port: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port,
    })
}

fn as_list(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// The value of `name` in a RESP3 map or a RESP2 flat key/value array.
fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| as_text(k).as_deref() == Some(name))
            .map(|(_, v)| v),
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| as_text(&pair[0]).as_deref() == Some(name))
            .and_then(|pair| pair.get(1)),
        _ => None,
    }
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_nodes_carry_the_credentials() {
        assert_eq!(
            seed_nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            seed_nodes("rediss+cluster://u:p%40ss@a:1,b:2/").unwrap(),
            ["rediss://u:p%40ss@a:1", "rediss://u:p%40ss@b:2"]
        );
        assert!(is_cluster_url("REDIS+CLUSTER://a:1"));
        assert!(!is_cluster_url("redis://a:1"));
    }

    #[test]
    fn bad_cluster_urls_are_config_errors_without_the_password() {
        for url in [
            "redis://a:1",
            "redis+cluster://",
            "redis+cluster://:secret@a:1,,b:2",
            "redis+cluster://:secret@a",
            "redis+cluster://:secret@a:1/2",
            "redis+cluster://:secret@a:1?protocol=resp2",
        ] {
            let e = seed_nodes(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        assert!(same_slot(b"bgl:{a:b}", b"bgn:{a:b}"));
        assert!(!same_slot(b"bgl:{task:1}", b"bgl:{task:2}"));
    }
}
