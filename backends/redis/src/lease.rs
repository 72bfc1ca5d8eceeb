//! Leases: a sorted set and a hash per lease key; one Lua script for the operations that decide
//! (acquire, list, count), a plain transaction for release.

use std::time::Duration;

use bgtask_core::{
    Acquired, Admission, Error, ErrorKind, LeaseId, LeaseInfo, LeaseRequest, Result,
};
use redis::Value;

/// The prefix of the sorted set of a lease key: `bgl:{<key>}`.
pub const LEASES_PREFIX: &str = "bgl:{";
/// The prefix of the hash of a lease key: `bgn:{<key>}`.
pub const NOTES_PREFIX: &str = "bgn:{";

/// The prefix of a claim (see [`Broker::claim`](bgtask_core::Broker::claim)): `bgc:{<key>}`, a
/// plain string set with `SET NX PX`, apart from every lease key.
pub const CLAIM_PREFIX: &str = "bgc:{";

/// The Redis key of claim key `key`.
pub(crate) fn claim_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(CLAIM_PREFIX.len() + key.len() + 1);
    k.extend_from_slice(CLAIM_PREFIX.as_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(b'}');
    k
}

/// The `SCAN MATCH` pattern of the lease sorted sets whose key starts with `prefix`: the
/// prefix with Redis's glob characters escaped, then `*`.
pub(crate) fn scan_pattern(prefix: &str) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(LEASES_PREFIX.len() + prefix.len() + 2);
    pattern.extend_from_slice(LEASES_PREFIX.as_bytes());
    for &b in prefix.as_bytes() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    pattern.push(b'*');
    pattern
}

/// The lease key of a Redis key that [`scan_pattern`] matched (`bgl:{<key>}`), if it is one.
pub(crate) fn lease_key_of(redis_key: &[u8]) -> Option<String> {
    let inner = redis_key
        .strip_prefix(LEASES_PREFIX.as_bytes())?
        .strip_suffix(b"}")?;
    String::from_utf8(inner.to_vec()).ok()
}

/// The longest TTL the backend stores, about 69 years; longer ones are capped to it. It keeps
/// every expiry an exact integer in Lua's doubles.
pub const MAX_TTL_MILLIS: u64 = 1 << 41;

/// The Redis keys of lease key `key`: its sorted set and its hash.
pub(crate) fn keys(key: &str) -> (Vec<u8>, Vec<u8>) {
    let wrap = |prefix: &str| {
        let mut k = Vec::with_capacity(prefix.len() + key.len() + 1);
        k.extend_from_slice(prefix.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k.push(b'}');
        k
    };
    (wrap(LEASES_PREFIX), wrap(NOTES_PREFIX))
}

/// The script behind `acquire`, `admit`, `leases` and `count` (`release` is a plain transaction, see
/// [`ReleaseReply`]). `KEYS[1]` is the sorted set (member = lease id,
/// score = expiry in ms by the server's clock), `KEYS[2]` the hash (lease id -> "<seq>:<note>",
/// plus the counter field `#seq` that orders leases by acquisition). `ARGV[1]` names the
/// operation.
pub(crate) const SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leases, notes = KEYS[1], KEYS[2]
local op = ARGV[1]

-- The hot path first, before anything else is defined (each call pays for what the script
-- runs): an admission where neither the blacklist flag (KEYS[3]) nor the limit key exists, so
-- one EXISTS settles both. The first lease, as `acquire` below adds it to an empty key; with
-- ARGV[6] and ARGV[7], their PUBLISH. ARGV[3] is the TTL in whole ms.
if op == 'admit' and ARGV[4] ~= '0' and redis.call('EXISTS', KEYS[3], leases) == 0 then
  redis.call('ZADD', leases, string.format('%d', now + tonumber(ARGV[3])), ARGV[2])
  redis.call('HSET', notes, '#seq', 1, ARGV[2], '1:' .. ARGV[5])
  redis.call('PEXPIRE', leases, ARGV[3])
  redis.call('PEXPIRE', notes, ARGV[3])
  if ARGV[6] then return {1, 1, redis.call('PUBLISH', ARGV[6], ARGV[7])} end
  return {1, 1}
end

local function int(n) return string.format('%d', n) end

-- Remove the expired leases and their notes; returns how many there were.
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', int(now))
  if #expired == 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', int(now))
  for i = 1, #expired, 500 do
    redis.call('HDEL', notes, unpack(expired, i, math.min(i + 499, #expired)))
  end
  return #expired
end

-- Drop the expired leases; under the cap (ARGV[4], -1 for none), add lease ARGV[2] of ARGV[3] ms
-- with note ARGV[5]. Returns {1, live} when added, {0, live} when not. Every `redis.call` costs
-- more than the command it runs, so a key without leases (most keyed tasks' limit key) takes the
-- short way: nothing to purge, the order starts again at 1, the new lease is the longest.
local function acquire()
  local id, ttl, cap, note = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local live = redis.call('ZCARD', leases)
  if live > 0 then live = live - purge() end
  if cap >= 0 and live >= cap then return {0, live} end
  redis.call('ZADD', leases, int(now + ttl), id)
  local keep = ttl
  if live == 0 then
    redis.call('HSET', notes, '#seq', 1, id, '1:' .. note)
  else
    local seq = redis.call('HINCRBY', notes, '#seq', 1)
    redis.call('HSET', notes, id, int(seq) .. ':' .. note)
    local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
    keep = tonumber(last[2]) - now
  end
  -- Both keys live as long as their longest live lease: never less. (A release does not
  -- shorten them, so until the next acquire they may outlive it, never a lease acquired on them.)
  redis.call('PEXPIRE', leases, int(keep))
  redis.call('PEXPIRE', notes, int(keep))
  return {1, live + 1}
end

if op == 'acquire' then
  return acquire()
elseif op == 'admit' then
  -- KEYS[3], KEYS[4]: the blacklist flag's sorted set and hash. A live flag refuses, with its
  -- lease: {2, id, remaining ms, "<seq>:<note>"}. Else acquire, as above. With ARGV[6] and
  -- ARGV[7] (a channel and a message), a granted lease is followed by their PUBLISH, whose
  -- receiver count ends the answer: {1, live, receivers}. (The hot path at the top took the
  -- admissions to an empty key without a flag.)
  local flag = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #flag > 0 then
    local stored = redis.call('HGET', KEYS[4], flag[1]) or ''
    return {2, flag[1], int(tonumber(flag[2]) - now), stored}
  end
  local answer = acquire()
  if ARGV[6] and answer[1] == 1 then
    answer[3] = redis.call('PUBLISH', ARGV[6], ARGV[7])
  end
  return answer
elseif op == 'leases' then
  local items = redis.call('ZRANGEBYSCORE', leases, '(' .. int(now), '+inf', 'WITHSCORES')
  local out = {}
  for i = 1, #items, 2 do
    local id = items[i]
    out[#out + 1] = id
    out[#out + 1] = int(tonumber(items[i + 1]) - now)
    out[#out + 1] = redis.call('HGET', notes, id) or ''
  end
  return out
elseif op == 'count' then
  return redis.call('ZCOUNT', leases, '(' .. int(now), '+inf')
end
return redis.error_reply('bgtask: unknown lease operation')
"#;

/// The replies of `release`: `TIME`, the lease's expiry (`ZSCORE`), and the counts removed by
/// `ZREM` and `HDEL`.
pub(crate) type ReleaseReply = ((u64, u64), Option<f64>, u64, u64);

/// The commands of `release`: `TIME`, the lease's expiry (`ZSCORE`), `ZREM` and `HDEL`, in one
/// pipeline. One connection's commands run in order, and nothing that runs between them can make
/// the lease live again (lease ids are unique and a lease is never extended), so on one server
/// they need no transaction, whose `MULTI`, `QUEUED`s and `EXEC` would double the replies to
/// parse. `atomic` (a cluster) wraps them in `MULTI`/`EXEC`, which keeps `TIME` on the key's node.
pub(crate) fn release_pipe(key: &str, lease: &LeaseId, atomic: bool) -> redis::Pipeline {
    let (leases, notes) = keys(key);
    let id = lease.as_str();
    let mut pipe = redis::pipe();
    if atomic {
        pipe.atomic();
    }
    pipe.cmd("TIME")
        .zscore(&leases, id)
        .zrem(&leases, id)
        .hdel(&notes, id);
    pipe
}

/// The reply of `release_and_publish`: the release's replies, then `PUBLISH`'s receiver count.
pub(crate) type ReleaseAndPublishReply = ((u64, u64), Option<f64>, u64, u64, u64);

/// A `TIME` reply (seconds, microseconds) in milliseconds, as the script computes `now`.
pub(crate) fn millis((seconds, micros): (u64, u64)) -> u64 {
    seconds.saturating_mul(1000).saturating_add(micros / 1000)
}

/// Build the arguments of an `acquire` call, or (`op` = `admit`) of an `admit` call; an admit
/// that publishes when granted appends the channel and the message.
pub(crate) fn acquire_args(op: &str, id: &LeaseId, request: &LeaseRequest) -> Vec<Vec<u8>> {
    let ttl = request.ttl_millis().min(MAX_TTL_MILLIS);
    let cap = match request.cap {
        // Any cap beyond i64 is as good as none.
        Some(cap) => i64::try_from(cap).unwrap_or(-1),
        None => -1,
    };
    vec![
        op.as_bytes().to_vec(),
        id.as_str().as_bytes().to_vec(),
        ttl.to_string().into_bytes(),
        cap.to_string().into_bytes(),
        request.note.as_bytes().to_vec(),
    ]
}

fn unexpected(what: &str, value: &Value) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("redis lease script answered {what} with an unexpected value: {value:?}"),
    )
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Read the answer of `acquire`.
pub(crate) fn parse_acquired(id: LeaseId, value: Value) -> Result<Acquired> {
    let parsed = match &value {
        Value::Array(items) if items.len() == 2 => as_u64(&items[0]).zip(as_u64(&items[1])),
        _ => None,
    };
    match parsed {
        Some((1, live)) => Ok(Acquired {
            lease: Some(id),
            live,
        }),
        Some((0, live)) => Ok(Acquired { lease: None, live }),
        _ => Err(unexpected("acquire", &value)),
    }
}

/// Read the answer of `admit` (made with lease id `id`), and the receiver count of the publish
/// that follows a granted lease when the call carried a message.
pub(crate) fn parse_admission(id: LeaseId, value: Value) -> Result<(Admission, Option<u64>)> {
    match value {
        Value::Array(items) if items.len() == 4 && as_u64(&items[0]) == Some(2) => {
            let flag = parse_leases(Value::Array(items[1..].to_vec()))?;
            match flag.into_iter().next() {
                Some(flag) => Ok((Admission::Blacklisted(flag), None)),
                None => Err(unexpected("admit", &Value::Array(items))),
            }
        }
        Value::Array(mut items) if items.len() == 3 && as_u64(&items[0]) == Some(1) => {
            let receivers = items.pop().as_ref().and_then(as_u64);
            let Some(receivers) = receivers else {
                return Err(unexpected("admit", &Value::Array(items)));
            };
            let admission = Admission::from(parse_acquired(id, Value::Array(items))?);
            Ok((admission, Some(receivers)))
        }
        value => Ok((Admission::from(parse_acquired(id, value)?), None)),
    }
}

/// Read the answer of `count`.
pub(crate) fn parse_count(value: Value) -> Result<u64> {
    as_u64(&value).ok_or_else(|| unexpected("count", &value))
}

/// Read the answer of `leases`: triples of id, remaining ms and "<seq>:<note>", returned oldest
/// first.
pub(crate) fn parse_leases(value: Value) -> Result<Vec<LeaseInfo>> {
    let Value::Array(items) = &value else {
        return Err(unexpected("leases", &value));
    };
    if !items.len().is_multiple_of(3) {
        return Err(unexpected("leases", &value));
    }
    let mut leases = Vec::with_capacity(items.len() / 3);
    for triple in items.chunks(3) {
        let (Some(id), Some(remaining), Some(stored)) = (
            as_string(&triple[0]),
            as_u64(&triple[1]),
            as_string(&triple[2]),
        ) else {
            return Err(unexpected("leases", &value));
        };
        // A lease without a note entry (it cannot happen, but keep it) sorts last.
        let (seq, note) = match stored.split_once(':') {
            Some((seq, note)) => (seq.parse::<u64>().unwrap_or(u64::MAX), note.to_owned()),
            None => (u64::MAX, String::new()),
        };
        leases.push((
            seq,
            LeaseInfo {
                id: LeaseId::new(id),
                note,
                remaining: Duration::from_millis(remaining),
            },
        ));
    }
    leases.sort_by_key(|(seq, _)| *seq);
    Ok(leases.into_iter().map(|(_, info)| info).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_globs_and_keys_come_back() {
        assert_eq!(
            scan_pattern("a*b?[c]\\"),
            b"bgl:{a\\*b\\?\\[c\\]\\\\*".to_vec()
        );
        let (leases, notes) = keys("ns:v1:limit:1:t:}x");
        assert_eq!(lease_key_of(&leases).as_deref(), Some("ns:v1:limit:1:t:}x"));
        assert_eq!(lease_key_of(&notes), None);
    }

    #[test]
    fn keys_are_prefixed_and_distinct() {
        let (l, n) = keys("a b*>");
        assert_eq!(l, b"bgl:{a b*>}");
        assert_eq!(n, b"bgn:{a b*>}");
        assert_ne!(keys("a").0, keys("a}").0);
    }

    #[test]
    fn parses_leases_in_acquisition_order() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let value = Value::Array(vec![
            bulk("b"),
            Value::Int(900),
            bulk("2:second: with colon"),
            bulk("a"),
            Value::Int(1000),
            bulk("1:"),
        ]);
        let leases = parse_leases(value).unwrap();
        assert_eq!(leases[0].id.as_str(), "a");
        assert_eq!(leases[0].note, "");
        assert_eq!(leases[1].note, "second: with colon");
        assert_eq!(leases[1].remaining, Duration::from_millis(900));
    }

    #[test]
    fn caps_arguments() {
        let id = LeaseId::new("x");
        let args = acquire_args(
            "acquire",
            &id,
            &LeaseRequest::new(Duration::MAX).cap(u64::MAX),
        );
        assert_eq!(args[2], MAX_TTL_MILLIS.to_string().into_bytes());
        assert_eq!(args[3], b"-1");
        let args = acquire_args("acquire", &id, &LeaseRequest::new(Duration::ZERO));
        assert_eq!(args[2], b"1");
    }
}
