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
    let mut hex = String::with_capacity(32);
    for shift in (0..32).rev() {
        hex.push(DIGITS[((id >> (shift * 4)) & 0xf) as usize] as char);
    }
    hex
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

    fn prefix(&self, kind: &str) -> String {
        format!("{}:{PROTOCOL_LEVEL}:{kind}:", self.0)
    }

    /// The channel a task name's tasks are published on.
    pub fn task_channel(&self, task: &str) -> String {
        self.prefix("task") + task
    }

    /// A targeted channel: only workers that listen to it see tasks sent there.
    pub fn target_channel(&self, target: &str) -> String {
        self.prefix("target") + target
    }

    /// A creator's reply channel.
    pub fn reply_channel(&self, client_id: &str) -> String {
        self.prefix("reply") + client_id
    }

    /// The namespace's cancellation channel: every worker listens; creators publish there when
    /// a task is cancelled or times out.
    pub fn cancel_channel(&self) -> String {
        format!("{}:{PROTOCOL_LEVEL}:cancel", self.0)
    }

    /// The first-accept-wins claim of one task.
    pub fn claim_key(&self, task_id: &str) -> String {
        self.prefix("claim") + task_id
    }

    /// The in-flight leases of one key value of one task name.
    ///
    /// The task name's length is written first, so no pair of (task, value) meets another.
    pub fn limit_key(&self, task: &str, value: &str) -> String {
        format!("{}{}:{task}:{value}", self.prefix("limit"), task.len())
    }

    /// The recent failure reports of one key value.
    pub fn failures_key(&self, task: &str, value: &str) -> String {
        format!("{}{}:{task}:{value}", self.prefix("failures"), task.len())
    }

    /// The blacklist flag of one key value (one lease whose note is the reason).
    pub fn blacklist_key(&self, task: &str, value: &str) -> String {
        format!("{}{}:{task}:{value}", self.prefix("blacklist"), task.len())
    }

    /// The index of blacklisted key values of the namespace (one lease per blacklisting).
    pub fn blacklist_index_key(&self) -> String {
        format!("{}:{PROTOCOL_LEVEL}:blacklisted", self.0)
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
}
