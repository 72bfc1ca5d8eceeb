//! Any bytes on any channel: decoding never panics, and what decodes re-encodes to the same
//! message. Also the task-key extraction a creator runs on payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bgtask_core::__fuzz::decode_message(data);
    if let Some((&first, rest)) = data.split_first() {
        let split = usize::from(first).min(rest.len());
        let (key, payload) = rest.split_at(split);
        if let Ok(key) = std::str::from_utf8(key) {
            bgtask_core::__fuzz::key_value(payload, key);
        }
    }
});
