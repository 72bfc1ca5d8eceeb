//! What the binary's tests share: finding the test servers.
#![allow(dead_code, unreachable_pub)]

pub mod browser;
pub mod scratch;

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The URL in `var` (else `default`), after checking that its host answers on TCP; fails (never
/// skips) with a message saying how to start the server when it does not.
pub fn require_server(var: &str, default: &str, default_port: u16) -> String {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = rest.split(['/', '?']).next().unwrap_or_default();
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let reachable = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok());
    assert!(
        reachable,
        "no server at {hostport} ({var}={url}): run `scripts/test`, which starts the servers, or \
         `docker compose up -d --wait`, or point {var} at one"
    );
    url
}

/// Redis for the tests: BGTASK_REDIS_URL, default redis://127.0.0.1:6379.
pub fn require_redis() -> String {
    require_server("BGTASK_REDIS_URL", "redis://127.0.0.1:6379", 6379)
}
