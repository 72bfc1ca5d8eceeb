//! The scenarios, one public async function each, grouped by what they exercise.
//!
//! Each takes a [`Harness`](crate::Harness) and panics on failure.

pub mod admission;
pub mod broker;
pub mod faults;
pub mod hostile;
pub mod keys;
pub mod lifecycle;
pub mod listing;
pub mod offers;
pub mod protocol;

/// Names that trip naive mappings: NATS wildcards and token separators, reserved prefixes,
/// quotes, case, non-ASCII, and long names that share a prefix.
pub fn hostile_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "a",
        "a.*",
        "a.>",
        "a.b",
        "a b",
        "*",
        ">",
        "$SYS.x",
        "A",
        "a:b",
        "\"q'",
        "a\\b",
        "é✓ünï",
        "a/b",
        "a%2Eb",
        "a-b",
        "a_b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = "x".repeat(500);
    names.push(format!("{long}1"));
    names.push(format!("{long}2"));
    names.push(long.to_uppercase());
    names
}

/// Make `calls` calls of `call` at once, spread over four brokers (as from four processes):
/// the results in call order, and the brokers.
pub(crate) async fn from_four_brokers<T, Fut: std::future::Future<Output = T>>(
    h: &crate::Harness,
    calls: usize,
    call: impl Fn(bgtask_core::DynBroker) -> Fut,
) -> (Vec<T>, Vec<bgtask_core::DynBroker>) {
    let mut brokers = Vec::new();
    for _ in 0..4 {
        brokers.push(h.broker().await);
    }
    let all = (0..calls).map(|i| call(brokers[i % brokers.len()].clone()));
    (futures::future::join_all(all).await, brokers)
}
