//! Validated names and the channel and key layout of the protocol.
//!
//! Every channel and lease key the protocol uses is built here, so the layout documented in
//! `docs/protocol.md` has a single source.

use crate::error::{Error, ErrorKind, Result};

/// The protocol level carried in every channel and key; mixed versions of one level interoperate.
pub const PROTOCOL_LEVEL: &str = "v1";

/// The longest task name, target channel or key value accepted, in bytes.
///
/// Channels built from it stay under the 1 KiB every backend must carry.
pub const MAX_NAME_BYTES: usize = 512;

/// The longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "bgtask";

/// A random 128-bit identifier as 32 lowercase hex digits.
pub fn random_id() -> String {
    id_to_hex(rand::random::<u128>())
}

/// A 128-bit identifier as 32 lowercase hex digits.
pub fn id_to_hex(id: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = DIGITS[((id >> ((31 - i) * 4)) & 0xf) as usize];
    }
    // Every byte is an ASCII hex digit.
    String::from_utf8_lossy(&hex).into_owned()
}

/// `parts` concatenated into one string allocated once (the channel and key builders run per
/// task, where `format!` costs more than the rest of the name mapping).
fn concat(parts: &[&str]) -> String {
    let mut joined = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        joined.push_str(part);
    }
    joined
}

/// Check a task name, target channel or key value: 1 to [`MAX_NAME_BYTES`] bytes of UTF-8 with
/// no control characters. Anything else (dots, spaces, `*`, `>`, `$`, quotes, non-ASCII) is fine.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("{what} must not be empty"),
        ));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "{what} is {} bytes long; the limit is {MAX_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("{what} contains the control character {c:?}"),
        ));
    }
    Ok(())
}

/// A validated namespace: 1 to 64 ASCII letters, digits, `_` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// Validate `name` as a namespace.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= MAX_NAMESPACE_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "namespace {name:?} must be 1 to {MAX_NAMESPACE_BYTES} ASCII letters, digits, '_' or '-'"
                ),
            ));
        }
        Ok(Namespace(name))
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<namespace>:v1:<kind>:<name>`.
    fn name(&self, kind: &str, name: &str) -> String {
        concat(&[&self.0, ":", PROTOCOL_LEVEL, ":", kind, ":", name])
    }

    /// `<namespace>:v1:<kind>:<task length>:<task>:<value>`.
    fn keyed(&self, kind: &str, task: &str, value: &str) -> String {
        let length = task.len().to_string();
        concat(&[
            &self.0,
            ":",
            PROTOCOL_LEVEL,
            ":",
            kind,
            ":",
            &length,
            ":",
            task,
            ":",
            value,
        ])
    }

    /// The channel a task name's tasks are published on.
    pub fn task_channel(&self, task: &str) -> String {
        self.name("task", task)
    }

    /// A targeted channel: only workers that listen to it see tasks sent there.
    pub fn target_channel(&self, target: &str) -> String {
        self.name("target", target)
    }

    /// A creator's reply channel.
    pub fn reply_channel(&self, client_id: &str) -> String {
        self.name("reply", client_id)
    }

    /// The namespace's cancellation channel: every worker listens; creators publish there when
    /// a task is cancelled or times out.
    pub fn cancel_channel(&self) -> String {
        concat(&[&self.0, ":", PROTOCOL_LEVEL, ":cancel"])
    }

    /// One worker's own channel: directed offers for that worker only.
    pub fn worker_channel(&self, worker_id: &str) -> String {
        self.name("worker", worker_id)
    }

    /// The namespace's presence channel: workers announce joins, heartbeats and leaves there;
    /// creators listen.
    pub fn presence_channel(&self) -> String {
        concat(&[&self.0, ":", PROTOCOL_LEVEL, ":presence"])
    }

    /// The namespace's presence key: one lease per live worker, its note the worker's record.
    pub fn workers_key(&self) -> String {
        concat(&[&self.0, ":", PROTOCOL_LEVEL, ":workers"])
    }

    /// The first-accept-wins claim of one task.
    pub fn claim_key(&self, task_id: &str) -> String {
        self.name("claim", task_id)
    }

    /// The in-flight leases of one key value of one task name.
    ///
    /// The task name's length is written first, so no pair of (task, value) meets another.
    pub fn limit_key(&self, task: &str, value: &str) -> String {
        self.keyed("limit", task, value)
    }

    /// The prefix every [`limit_key`](Self::limit_key) of the namespace starts with, or of one
    /// task name's limit keys: for listing the key values in flight.
    pub fn limit_prefix(&self, task: Option<&str>) -> String {
        match task {
            Some(task) => self.keyed("limit", task, ""),
            None => concat(&[&self.0, ":", PROTOCOL_LEVEL, ":limit:"]),
        }
    }

    /// The task name and key value of a [`limit_key`](Self::limit_key) of this namespace, or
    /// `None` for any other key.
    pub fn parse_limit_key(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(self.limit_prefix(None).as_str())?;
        let (length, rest) = rest.split_once(':')?;
        if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let length: usize = length.parse().ok()?;
        let task = rest.get(..length)?;
        let value = rest.get(length..)?.strip_prefix(':')?;
        Some((task.to_owned(), value.to_owned()))
    }

    /// The recent failure reports of one key value.
    pub fn failures_key(&self, task: &str, value: &str) -> String {
        self.keyed("failures", task, value)
    }

    /// The blacklist flag of one key value (one lease whose note is the reason).
    pub fn blacklist_key(&self, task: &str, value: &str) -> String {
        self.keyed("blacklist", task, value)
    }

    /// The index of blacklisted key values of the namespace (one lease per blacklisting).
    pub fn blacklist_index_key(&self) -> String {
        concat(&[&self.0, ":", PROTOCOL_LEVEL, ":blacklisted"])
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace(DEFAULT_NAMESPACE.to_owned())
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_keys_parse_back() {
        let ns = Namespace::new("app").unwrap();
        for (task, value) in [
            ("echo", "u"),
            ("a:b", "c"),
            ("a", "b:c"),
            ("é", ""),
            ("t", "::"),
        ] {
            let key = ns.limit_key(task, value);
            assert!(key.starts_with(&ns.limit_prefix(None)));
            assert!(key.starts_with(&ns.limit_prefix(Some(task))));
            assert_eq!(
                ns.parse_limit_key(&key),
                Some((task.to_owned(), value.to_owned()))
            );
        }
        assert!(!ns
            .limit_key("ab", "c")
            .starts_with(&ns.limit_prefix(Some("a"))));
        for other in [
            ns.claim_key("x"),
            ns.blacklist_key("t", "v"),
            "app:v1:limit:9:t:v".to_owned(),
            "app:v1:limit::t:v".to_owned(),
            "app:v1:limit:+1:t:v".to_owned(),
            "other:v1:limit:1:t:v".to_owned(),
        ] {
            assert_eq!(ns.parse_limit_key(&other), None, "{other}");
        }
    }

    #[test]
    fn ids_are_32_hex_digits() {
        assert_eq!(id_to_hex(0xabc), format!("{:032x}", 0xabc));
        assert_eq!(id_to_hex(u128::MAX), "f".repeat(32));
        assert_eq!(random_id().len(), 32);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("task", "a.*").is_ok());
        assert!(validate_name("task", "$SYS.x y \"q\" é").is_ok());
        assert_eq!(
            validate_name("task", "").unwrap_err().kind(),
            ErrorKind::InvalidName
        );
        assert_eq!(
            validate_name("task", "a\0b").unwrap_err().kind(),
            ErrorKind::InvalidName
        );
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            validate_name("task", &long).unwrap_err().kind(),
            ErrorKind::InvalidName
        );
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(Namespace::new("app-1_x").is_ok());
        for bad in ["", "a:b", "a b", "é"] {
            assert_eq!(
                Namespace::new(bad).unwrap_err().kind(),
                ErrorKind::InvalidName
            );
        }
    }

    #[test]
    fn keys_of_different_pairs_never_meet() {
        let ns = Namespace::default();
        assert_ne!(ns.limit_key("a:b", "c"), ns.limit_key("a", "b:c"));
        assert_ne!(ns.task_channel("x"), ns.target_channel("x"));
    }

    #[test]
    fn layout_is_as_documented() {
        let ns = Namespace::new("app").unwrap();
        assert_eq!(ns.task_channel("echo"), "app:v1:task:echo");
        assert_eq!(ns.target_channel("w1"), "app:v1:target:w1");
        assert_eq!(ns.reply_channel("c1"), "app:v1:reply:c1");
        assert_eq!(ns.cancel_channel(), "app:v1:cancel");
        assert_eq!(ns.worker_channel("w1"), "app:v1:worker:w1");
        assert_eq!(ns.presence_channel(), "app:v1:presence");
        assert_eq!(ns.workers_key(), "app:v1:workers");
        assert_eq!(ns.claim_key("id"), "app:v1:claim:id");
        assert_eq!(ns.limit_key("echo", "u"), "app:v1:limit:4:echo:u");
        assert_eq!(ns.failures_key("echo", "u"), "app:v1:failures:4:echo:u");
        assert_eq!(ns.blacklist_key("echo", "u"), "app:v1:blacklist:4:echo:u");
        assert_eq!(ns.blacklist_index_key(), "app:v1:blacklisted");
    }
}
