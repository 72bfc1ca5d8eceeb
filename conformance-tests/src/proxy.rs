//! [`FaultProxy`]: a small TCP proxy that injects network faults between a client and a server.
//!
//! Tests put the proxy between a backend and its shared server and switch its mode to simulate an
//! outage, without ever stopping the server:
//!
//! | mode | open connections | new connections |
//! |------|------------------|-----------------|
//! | [`pass`](FaultProxy::pass) (default) | forwarded | accepted and forwarded |
//! | [`cut`](FaultProxy::cut) | reset at once | reset at once |
//! | [`refuse`](FaultProxy::refuse) | keep working | reset at once |
//! | [`black_hole`](FaultProxy::black_hole) | stay open, nothing forwarded | accepted, nothing forwarded |
//!
//! In a black hole the bytes the proxy reads are discarded. TCP never loses bytes in the middle
//! of a stream, so a connection through which any byte was discarded is reset when the black hole
//! ends (as a real stalled connection eventually is); a connection that carried nothing during
//! the black hole carries on.
//!
//! Dropping the proxy stops its listener and resets every connection it holds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long the proxy waits for the upstream server to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The size of each direction's copy buffer.
const BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Cut,
    Refuse,
    BlackHole,
}

/// A TCP proxy on `127.0.0.1` that forwards to one upstream address and can cut, refuse or
/// black-hole connections on demand. See the [module docs](self) for the modes.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    connections: Arc<AtomicUsize>,
    listener: JoinHandle<()>,
}

impl FaultProxy {
    /// Start a proxy listening on `127.0.0.1` (a free port) that forwards to `upstream`, in
    /// [`pass`](Self::pass) mode.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let connections = Arc::new(AtomicUsize::new(0));
        let listener = tokio::spawn(listen(listener, upstream, mode_rx, connections.clone()));
        Ok(FaultProxy {
            addr,
            upstream,
            mode,
            connections,
            listener,
        })
    }

    /// The address clients connect to instead of the upstream server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream server's address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Forward everything normally (the default). Ends any other mode.
    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Reset every open connection now and reset every new one at once, until another mode is
    /// set: a server that went away.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Keep open connections working but reset every new one at once, until another mode is
    /// set: a server that refuses connections.
    pub fn refuse(&self) {
        self.mode.send_replace(Mode::Refuse);
    }

    /// Keep connections open and accept new ones, but forward nothing in either direction
    /// (bytes read are discarded), until another mode is set: a network that silently stalls.
    pub fn black_hole(&self) {
        self.mode.send_replace(Mode::BlackHole);
    }

    /// The number of client connections the proxy currently holds open.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping `mode` (after this) makes every connection task see a closed watch channel,
        // which resets its connection; the listener is stopped here.
        self.listener.abort();
    }
}

/// Reset a socket: drop it with a zero linger so the peer sees a connection reset.
fn reset(stream: TcpStream) {
    // A zero linger never blocks on close, which is what the deprecation warns about.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn listen(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    connections: Arc<AtomicUsize>,
) {
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return; // the proxy was dropped
                }
            }
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of file descriptors or similar: back off briefly and keep listening.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let current = *mode.borrow();
                if matches!(current, Mode::Cut | Mode::Refuse) {
                    reset(client);
                    continue;
                }
                let _ = client.set_nodelay(true);
                connections.fetch_add(1, Ordering::SeqCst);
                let guard = CountGuard(connections.clone());
                tokio::spawn(connection(client, upstream, mode.clone(), guard));
            }
        }
    }
}

/// Decrements the open connection count when a connection task ends.
struct CountGuard(Arc<AtomicUsize>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What ended one phase of a connection.
enum Phase {
    /// Both peers closed their side normally: close ours normally too (no reset, which would
    /// destroy data the client has not read yet).
    Closed,
    /// The mode changed; look at it again.
    ModeChanged,
    /// The connection is over (closed by a peer, an I/O error, a cut or the proxy dropped).
    Done,
}

/// The current mode, or `Cut` when the proxy is gone.
fn current(mode: &mut watch::Receiver<Mode>) -> Mode {
    if mode.has_changed().is_err() {
        return Mode::Cut;
    }
    *mode.borrow_and_update()
}

async fn connection(
    mut client: TcpStream,
    upstream_addr: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    _guard: CountGuard,
) {
    let mut upstream: Option<TcpStream> = None;
    // Set once a byte was discarded: the streams can no longer be joined up faithfully.
    let mut tainted = false;
    loop {
        match current(&mut mode) {
            Mode::Cut => break,
            Mode::Pass | Mode::Refuse => {
                if tainted {
                    break;
                }
                let up = match upstream.as_mut() {
                    Some(up) => up,
                    None => {
                        let connect = TcpStream::connect(upstream_addr);
                        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect).await {
                            Ok(Ok(up)) => {
                                let _ = up.set_nodelay(true);
                                upstream.insert(up)
                            }
                            _ => break,
                        }
                    }
                };
                match forward(&mut client, up, &mut mode).await {
                    Phase::ModeChanged => continue,
                    Phase::Done => break,
                    Phase::Closed => return, // both sides already shut down; drop closes
                }
            }
            Mode::BlackHole => {
                match discard(&mut client, upstream.as_mut(), &mut mode, &mut tainted).await {
                    Phase::ModeChanged => continue,
                    Phase::Done | Phase::Closed => break,
                }
            }
        }
    }
    reset(client);
    if let Some(up) = upstream {
        reset(up);
    }
}

/// Whether a mode change must interrupt forwarding.
fn interrupts(mode: &mut watch::Receiver<Mode>) -> bool {
    matches!(current(mode), Mode::Cut | Mode::BlackHole)
}

/// What a mode change means for a copy in progress: the proxy is gone (`Done`), the new mode
/// stops forwarding (`interrupted`), or nothing (`None`: go on).
fn stops(
    changed: Result<(), watch::error::RecvError>,
    mode: &mut watch::Receiver<Mode>,
    interrupted: Phase,
) -> Option<Phase> {
    if changed.is_err() {
        return Some(Phase::Done);
    }
    interrupts(mode).then_some(interrupted)
}

/// Copy both directions until a peer closes, an error occurs, or the mode changes to one that
/// stops forwarding.
async fn forward(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: &mut watch::Receiver<Mode>,
) -> Phase {
    let (mut client_rd, mut client_wr) = client.split();
    let (mut up_rd, mut up_wr) = upstream.split();
    // The two directions run at once: a peer blocked writing to us must never stop us reading
    // from it (that would deadlock a large echo).
    let (mut mode_up, mut mode_down) = (mode.clone(), mode.clone());
    let up = pump(&mut client_rd, &mut up_wr, &mut mode_up);
    let down = pump(&mut up_rd, &mut client_wr, &mut mode_down);
    tokio::pin!(up, down);
    let (mut up_result, mut down_result) = (None, None);
    // Wait for both directions: after a mode change each returns at once (`ModeChanged` when
    // idle, `Done` when it was cut off in the middle of a write, so the stream cannot resume).
    while up_result.is_none() || down_result.is_none() {
        tokio::select! {
            phase = &mut up, if up_result.is_none() => up_result = Some(phase),
            phase = &mut down, if down_result.is_none() => down_result = Some(phase),
        }
    }
    let _ = current(mode); // the pumps saw the change on their copies of the receiver
    match (up_result.flatten(), down_result.flatten()) {
        (None, None) => Phase::Closed,
        (Some(Phase::Done), _) | (_, Some(Phase::Done)) => Phase::Done,
        _ => Phase::ModeChanged,
    }
}

/// Copy one direction until its end of stream (`None`, after passing the end on), an error, or
/// a mode change that stops forwarding.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mode: &mut watch::Receiver<Mode>,
) -> Option<Phase>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        tokio::select! {
            biased;
            changed = mode.changed() => {
                if let Some(phase) = stops(changed, mode, Phase::ModeChanged) {
                    return Some(phase);
                }
            }
            n = reader.read(&mut buffer) => match n {
                Ok(0) => {
                    let _ = writer.shutdown().await;
                    return None;
                }
                Ok(n) => {
                    if let Some(phase) = write_unless_interrupted(writer, &buffer[..n], mode).await {
                        return Some(phase);
                    }
                }
                Err(_) => return Some(Phase::Done),
            },
        }
    }
}

async fn write_unless_interrupted<W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    mode: &mut watch::Receiver<Mode>,
) -> Option<Phase> {
    let write = writer.write_all(bytes);
    tokio::pin!(write);
    loop {
        tokio::select! {
            biased;
            changed = mode.changed() => {
                // Part of the bytes may be lost: this connection cannot resume.
                if let Some(phase) = stops(changed, mode, Phase::Done) {
                    return Some(phase);
                }
            }
            written = &mut write => {
                return match written {
                    Ok(()) => None,
                    Err(_) => Some(Phase::Done),
                };
            }
        }
    }
}

/// Read and discard from both sides until the mode changes or a peer closes.
async fn discard(
    client: &mut TcpStream,
    upstream: Option<&mut TcpStream>,
    mode: &mut watch::Receiver<Mode>,
    tainted: &mut bool,
) -> Phase {
    let mut buf = vec![0u8; BUFFER];
    let mut up_buf = vec![0u8; BUFFER];
    let mut upstream = upstream;
    loop {
        let up_read = async {
            match upstream.as_mut() {
                Some(up) => up.read(&mut up_buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            changed = mode.changed() => {
                return if changed.is_err() { Phase::Done } else { Phase::ModeChanged };
            }
            n = client.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Phase::Done,
                Ok(_) => *tainted = true,
            },
            n = up_read => match n {
                Ok(0) | Err(_) => return Phase::Done,
                Ok(_) => *tainted = true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use tokio::time::{sleep, timeout};

    /// A proxy in front of an echo server, and one connection through it that echoed once.
    async fn echoing() -> (FaultProxy, TcpStream) {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut s, b"a").await.unwrap(), b"a");
        (proxy, s)
    }

    /// An echo server on a free port; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Send `msg` and expect it back within a second.
    async fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        timeout(Duration::from_secs(1), s.read_exact(&mut got))
            .await
            .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "no echo"))??;
        Ok(got)
    }

    /// True when the peer closed or reset the connection within a second.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            timeout(Duration::from_secs(1), s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn wait_connections(proxy: &FaultProxy, n: usize) {
        for _ in 0..100 {
            if proxy.connections() == n {
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} connections, have {}", proxy.connections());
    }

    #[tokio::test]
    async fn passes_by_default() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut s, b"hello").await.unwrap(), b"hello");
        wait_connections(&proxy, 1).await;
        let big = vec![7u8; 1 << 20];
        let (mut rd, mut wr) = s.into_split();
        let sent = big.clone();
        let writer = tokio::spawn(async move { wr.write_all(&sent).await });
        let mut got = vec![0u8; big.len()];
        timeout(Duration::from_secs(5), rd.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, big);
    }

    #[tokio::test]
    async fn cut_resets_open_and_new_connections_until_pass() {
        let (proxy, mut s) = echoing().await;
        proxy.cut();
        assert!(closed(&mut s).await, "open connection survived a cut");
        wait_connections(&proxy, 0).await;
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            closed(&mut fresh).await,
            "new connection accepted during a cut"
        );
        proxy.pass();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut again, b"b").await.unwrap(), b"b");
    }

    #[tokio::test]
    async fn black_hole_forwards_nothing_and_keeps_connections_open() {
        let (proxy, mut s) = echoing().await;
        proxy.black_hole();
        let err = echo(&mut s, b"lost").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
        // New connections are accepted but silent as well.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            echo(&mut fresh, b"x").await.unwrap_err().kind(),
            ErrorKind::TimedOut
        );
        wait_connections(&proxy, 2).await;
        // An idle connection opened during the black hole works once it ends; the ones that lost
        // bytes are reset.
        let mut idle = TcpStream::connect(proxy.addr()).await.unwrap();
        wait_connections(&proxy, 3).await;
        proxy.pass();
        assert!(closed(&mut s).await, "a connection that lost bytes resumed");
        assert_eq!(echo(&mut idle, b"c").await.unwrap(), b"c");
    }

    #[tokio::test]
    async fn refuse_keeps_open_connections_and_resets_new_ones() {
        let (proxy, mut s) = echoing().await;
        proxy.refuse();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            closed(&mut fresh).await,
            "new connection accepted while refusing"
        );
        assert_eq!(echo(&mut s, b"b").await.unwrap(), b"b");
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn drop_closes_everything() {
        let (proxy, mut s) = echoing().await;
        let addr = proxy.addr();
        drop(proxy);
        assert!(closed(&mut s).await, "connection survived the proxy");
        sleep(Duration::from_millis(50)).await;
        match TcpStream::connect(addr).await {
            Err(_) => {}
            Ok(mut late) => assert!(closed(&mut late).await),
        }
    }
}
