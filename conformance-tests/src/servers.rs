//! Finding a backend's test server from its URL, for the backends' integration tests: the
//! address a fault proxy forwards to, and the URL that goes through the proxy instead; and the
//! connecting checks that need no server at all.

use std::fmt::Debug;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use bgtask_core::{ErrorKind, Result};

/// The TCP address of `url`'s host and port (`default_port` when it names none). Panics with
/// the URL's variable name when it does not parse or resolve.
pub fn server_addr(url: &str, var: &str, default_port: u16) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{var} is not a URL: {e}"));
    let host = parsed
        .host_str()
        .unwrap_or_else(|| panic!("{var} has no host"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, parsed.port().unwrap_or(default_port))
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve the host of {var}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("the host of {var} has no address"))
}

/// `url` with its host and port replaced by `addr`, everything else (credentials, database,
/// parameters) kept: how a broker reaches the server through a fault proxy.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let mut url = url::Url::parse(url).expect("a test server URL");
    url.set_ip_host(addr.ip()).expect("set the proxy host");
    url.set_port(Some(addr.port())).expect("set the proxy port");
    url.to_string()
}

/// A loopback port that was free a moment ago: nothing listens there.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

/// `connect(port)` to a loopback port nothing listens on, with `secret` in its URL, fails with
/// [`ErrorKind::Unavailable`] within `bound` (a refusal is not waited out), and its error
/// never shows `secret`.
pub async fn refused_connection_is_unavailable<B: Debug, F: Future<Output = Result<B>>>(
    connect: impl FnOnce(u16) -> F,
    secret: &str,
    bound: Duration,
) {
    let started = Instant::now();
    let err = connect(free_port()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let elapsed = started.elapsed();
    assert!(elapsed < bound, "{elapsed:?}");
    assert!(!format!("{err} {err:?}").contains(secret), "{err:?}");
}

/// `connect(addr)` through a fault proxy to `upstream` that swallows everything (a silent
/// server) fails with [`ErrorKind::Unavailable`] within `bound`: the connect timeout holds.
pub async fn silent_server_is_unavailable<B: Debug, F: Future<Output = Result<B>>>(
    upstream: SocketAddr,
    connect: impl FnOnce(SocketAddr) -> F,
    bound: Duration,
) {
    let proxy = crate::proxy::FaultProxy::start(upstream).await.unwrap();
    proxy.black_hole();
    let started = Instant::now();
    let err = connect(proxy.addr()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let elapsed = started.elapsed();
    assert!(elapsed < bound, "{elapsed:?}");
}
