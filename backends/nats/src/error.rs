//! Mapping `async-nats` errors onto bgtask's [`ErrorKind`]s.

use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind};
use async_nats::{ConnectError, ConnectErrorKind, PublishError, RequestError, SubscribeError};
use bgtask_core::{Error, ErrorKind};

/// The error of a failed connection attempt.
///
/// - refused credentials are [`ErrorKind::Auth`];
/// - an unusable server address or TLS setup (certificate files, a certificate the server
///   rejects or that does not verify) is [`ErrorKind::Config`];
/// - anything else (refused, reset, silent, DNS) is [`ErrorKind::Unavailable`].
pub(crate) fn from_connect(shown_url: &str, e: ConnectError) -> Error {
    let (kind, message) = match e.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::Auth,
            format!("nats server at {shown_url} refused the credentials"),
        ),
        ConnectErrorKind::ServerParse => (
            ErrorKind::Config,
            format!("nats: not a usable server address: {shown_url}"),
        ),
        ConnectErrorKind::Tls => (
            ErrorKind::Config,
            format!("nats: the TLS setup for {shown_url} is not usable"),
        ),
        ConnectErrorKind::Io if is_tls_rejection(&e) => (
            ErrorKind::Config,
            format!("nats: the TLS handshake with {shown_url} failed on a certificate"),
        ),
        _ => (
            ErrorKind::Unavailable,
            format!("nats server at {shown_url} is unavailable"),
        ),
    };
    Error::new(kind, message).with_source(e)
}

/// Whether an I/O error of a connection attempt is TLS refusing a certificate (rustls reports
/// those as `InvalidData` I/O errors), which retrying cannot fix.
fn is_tls_rejection(e: &ConnectError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                let text = io.to_string().to_ascii_lowercase();
                if text.contains("certificate") || text.contains("alert") {
                    return true;
                }
            }
        }
        source = err.source();
    }
    false
}

/// The error of a failed publish (before it reached the connection).
pub(crate) fn from_publish(what: &str, e: PublishError) -> Error {
    let kind = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::TooLarge,
        PublishErrorKind::InvalidSubject => ErrorKind::InvalidName,
        PublishErrorKind::Send => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("nats: {what} failed")).with_source(e)
}

/// The error of a failed subscribe (before it reached the connection).
pub(crate) fn from_subscribe(e: SubscribeError) -> Error {
    Error::new(ErrorKind::Unavailable, "nats: subscribe failed").with_source(e)
}

/// The error of a failed request. `NoResponders` is handled by the callers, which know what it
/// means for their subject.
pub(crate) fn from_request(what: &str, e: RequestError) -> Error {
    let kind = match e.kind() {
        RequestErrorKind::MaxPayloadExceeded => ErrorKind::TooLarge,
        RequestErrorKind::InvalidSubject => ErrorKind::InvalidName,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("nats: {what} failed")).with_source(e)
}

/// The error of an operation that did not finish within `bound`: `Unavailable`, as the `Broker`
/// contract asks of a silent broker (`TimedOut` is kept for a task passing its deadline).
pub(crate) fn no_answer(what: &str, bound: Duration) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("nats server did not answer {what} within {bound:?}"),
    )
}

/// The error of an operation while the client has no connection.
pub(crate) fn disconnected(what: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("nats unavailable: not connected (reconnecting); cannot {what}"),
    )
}

/// The error of an operation on a closed broker.
pub(crate) fn closed(what: &str) -> Error {
    Error::new(
        ErrorKind::Closed,
        format!("nats broker is closed; cannot {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_kinds() {
        for (connect, kind) in [
            (ConnectErrorKind::AuthorizationViolation, ErrorKind::Auth),
            (ConnectErrorKind::Io, ErrorKind::Unavailable),
            (ConnectErrorKind::TimedOut, ErrorKind::Unavailable),
            (ConnectErrorKind::Tls, ErrorKind::Config),
        ] {
            let error = ConnectError::new(connect);
            assert_eq!(from_connect("u", error).kind(), kind, "{connect:?}");
        }
        let big = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(from_publish("publish", big).kind(), ErrorKind::TooLarge);
        let late = RequestError::new(RequestErrorKind::TimedOut);
        assert_eq!(from_request("get", late).kind(), ErrorKind::Unavailable);
        assert_eq!(
            no_answer("x", Duration::from_secs(1)).kind(),
            ErrorKind::Unavailable
        );
    }
}
