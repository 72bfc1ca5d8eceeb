//! Names: validation never panics, and two different (task, value) pairs never map to the same
//! channel or lease key.
#![no_main]

use bgtask_core::names::{validate_name, Namespace};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parts: Vec<&str> = text.splitn(4, '\u{1}').collect();
    let [a, b, c, d] = parts[..] else {
        return;
    };
    if [a, b, c, d].iter().any(|n| validate_name("name", n).is_err()) {
        return;
    }
    let _ = Namespace::new(a);
    let ns = Namespace::default();
    if (a, b) != (c, d) {
        assert_ne!(ns.limit_key(a, b), ns.limit_key(c, d), "{a:?}/{b:?} vs {c:?}/{d:?}");
        assert_ne!(ns.blacklist_key(a, b), ns.blacklist_key(c, d));
        assert_ne!(ns.failures_key(a, b), ns.failures_key(c, d));
    }
    if a != c {
        assert_ne!(ns.task_channel(a), ns.task_channel(c));
        assert_ne!(ns.target_channel(a), ns.target_channel(c));
        assert_ne!(ns.task_channel(a), ns.target_channel(c));
        assert_ne!(ns.claim_key(a), ns.claim_key(c));
    }
});
