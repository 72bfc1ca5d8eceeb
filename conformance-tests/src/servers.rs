//! Finding a backend's test server from its URL, for the backends' integration tests: the
//! address a fault proxy forwards to, and the URL that goes through the proxy instead.

use std::net::{SocketAddr, ToSocketAddrs};

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
