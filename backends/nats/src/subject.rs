//! Names to subjects: every channel, lease key and claim key becomes one literal subject token.
//!
//! A name's UTF-8 bytes are encoded as unpadded base64url (`A-Z a-z 0-9 - _`), which contains
//! no `.`, `*`, `>`, whitespace or `$`: the token is always a single literal token, never a
//! wildcard, and never splits into several. The encoding is injective, so two different names
//! never share a subject. The empty name, whose encoding would be empty, is the token `_`, which
//! no non-empty name produces (an unpadded base64url text is never one character long).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bgtask_core::{Error, ErrorKind, Result};

/// The longest channel, lease key or claim key name the backend accepts, in bytes.
///
/// Its encoding is at most 2731 bytes, so a subject built from it stays well below the server's
/// default `max_control_line` of 4 KiB (which bounds the `PUB`/`SUB` line that carries it).
pub const MAX_NAME_BYTES: usize = 2048;

/// The subject token of `name`.
pub(crate) fn token(name: &str) -> String {
    if name.is_empty() {
        "_".to_owned()
    } else {
        URL_SAFE_NO_PAD.encode(name.as_bytes())
    }
}

/// The subjects of one broker, under its prefix.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    prefix: String,
}

impl Subjects {
    pub(crate) fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    /// `<prefix>.ch.<token>`: the subject of channel `name`.
    pub(crate) fn channel(&self, name: &str) -> Result<String> {
        check(name, "channel")?;
        Ok(format!("{}.ch.{}", self.prefix, token(name)))
    }

    /// `<prefix>.lease.<token>`: the subject of lease key `name` in the lease stream.
    pub(crate) fn lease(&self, name: &str) -> Result<String> {
        check(name, "lease key")?;
        Ok(format!("{}.lease.{}", self.prefix, token(name)))
    }

    /// `<prefix>.lease.*`: the lease stream's subject filter for keys.
    pub(crate) fn lease_filter(&self) -> String {
        format!("{}.lease.*", self.prefix)
    }

    /// The lease key whose subject is `subject` (the inverse of [`lease`](Self::lease)), if it
    /// is one.
    pub(crate) fn lease_key(&self, subject: &str) -> Option<String> {
        let token = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".lease.")?;
        if token == "_" {
            return Some(String::new());
        }
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()
    }

    /// `<prefix>.clock`: where the backend reads the lease stream's clock.
    pub(crate) fn clock(&self) -> String {
        format!("{}.clock", self.prefix)
    }

    /// `<prefix>.claim.<token>`: the subject of claim key `name` in the claim stream.
    pub(crate) fn claim(&self, name: &str) -> Result<String> {
        check(name, "claim key")?;
        Ok(format!("{}.claim.{}", self.prefix, token(name)))
    }

    /// `<prefix>.claim.*`: the claim stream's subject filter for keys.
    pub(crate) fn claim_filter(&self) -> String {
        format!("{}.claim.*", self.prefix)
    }

    /// `<prefix>.claimclock`: where the backend reads the claim stream's clock.
    pub(crate) fn claim_clock(&self) -> String {
        format!("{}.claimclock", self.prefix)
    }
}

fn check(name: &str, what: &str) -> Result<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "nats: a {what} name of {} bytes is longer than the {MAX_NAME_BYTES} bytes this \
                 backend maps onto a subject",
                name.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn literal_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    #[test]
    fn hostile_names_are_single_literal_tokens() {
        let long = "é".repeat(MAX_NAME_BYTES / 2);
        let names = [
            "", "a", "a.*", "a.>", "*", ">", "a b", "$SYS.x", "A", "a.b", "\t", "_", "-", &long,
        ];
        let mut seen = HashSet::new();
        for name in names {
            let t = token(name);
            assert!(literal_token(&t), "{name:?} -> {t:?}");
            assert!(seen.insert(t), "{name:?} met another name");
        }
        assert!(token(&long).len() < 2800);
    }

    #[test]
    fn subjects_stay_under_the_prefix() {
        let s = Subjects::new("bgtask");
        assert_eq!(s.channel("a.*").unwrap(), "bgtask.ch.YS4q");
        assert_eq!(s.lease("").unwrap(), "bgtask.lease._");
        assert_eq!(s.clock(), "bgtask.clock");
        assert_eq!(s.lease_filter(), "bgtask.lease.*");
        assert_eq!(s.claim("a.*").unwrap(), "bgtask.claim.YS4q");
        assert_eq!(s.claim_filter(), "bgtask.claim.*");
        assert_eq!(s.claim_clock(), "bgtask.claimclock");
        let err = s.claim(&"x".repeat(MAX_NAME_BYTES + 1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        let err = s.channel(&"x".repeat(MAX_NAME_BYTES + 1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        assert!(s.channel(&"x".repeat(MAX_NAME_BYTES)).is_ok());
    }

    #[test]
    fn lease_subjects_map_back_to_their_keys() {
        let subjects = Subjects::new("bg.x");
        for key in ["", "a", "ns:v1:limit:4:echo:ü *>"] {
            let subject = subjects.lease(key).unwrap();
            assert_eq!(subjects.lease_key(&subject).as_deref(), Some(key));
        }
        assert_eq!(subjects.lease_key("bg.x.claim.YQ"), None);
        assert_eq!(subjects.lease_key("bg.y.lease.YQ"), None);
    }

    #[test]
    fn empty_token_is_unambiguous() {
        // No byte string encodes to a single character.
        for b in 0..=255u8 {
            assert_eq!(URL_SAFE_NO_PAD.encode([b]).len(), 2);
        }
    }
}
