//! Criterion micro-benchmarks of the pure hot paths of bgtask-core: the envelope (encode and
//! decode of a task offer and of a reply), task-key extraction, and the name layout.
//!
//! `cargo bench -p bgtask-core`; for a quick pass, `cargo bench -p bgtask-core --bench hot_paths
//! -- --warm-up-time 1 --measurement-time 2` (the `--bench` keeps the options away from the
//! library's test harness), or a filter such as `-- envelope/decode`. Payloads are built like
//! `bgtask bench`'s: `{"user":"v42","data":"xxx…"}`, padded to 100 B, 10 KiB and 1 MiB.

use std::hint::black_box;

use bgtask_core::__bench as wire;
use bgtask_core::names::{id_to_hex, random_id, validate_name};
use bgtask_core::Namespace;
use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;

/// Payload sizes: 100 B, 10 KiB, 1 MiB.
const SIZES: [(usize, &str); 3] = [(100, "100B"), (10 * 1024, "10KiB"), (1024 * 1024, "1MiB")];

/// A payload of exactly `size` bytes with the task key `user` first, as `bgtask bench --key
/// user` builds it.
fn payload(size: usize) -> Box<RawValue> {
    let head = r#"{"user":"v42","data":""#;
    let filler = "x".repeat(size.saturating_sub(head.len() + 2));
    RawValue::from_string(format!("{head}{filler}\"}}")).expect("valid JSON")
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for (size, label) in SIZES {
        let body = payload(size);
        assert_eq!(body.get().len(), size);
        let task = wire::encode_task("bench", None, &body).expect("encodes");
        let keyed = wire::encode_task("bench", Some("v42"), &body).expect("encodes");
        let done = wire::encode_done(&body).expect("encodes");
        assert_eq!(wire::decode(&task).expect("decodes").body_len(), size);
        group.throughput(Throughput::Bytes(size as u64));

        group.bench_with_input(BenchmarkId::new("encode_task", label), &body, |b, body| {
            b.iter(|| wire::encode_task(black_box("bench"), None, black_box(body)))
        });
        group.bench_with_input(
            BenchmarkId::new("encode_task_keyed", label),
            &body,
            |b, body| {
                b.iter(|| wire::encode_task(black_box("bench"), Some("v42"), black_box(body)))
            },
        );
        group.bench_with_input(BenchmarkId::new("encode_done", label), &body, |b, body| {
            b.iter(|| wire::encode_done(black_box(body)))
        });
        group.bench_with_input(BenchmarkId::new("decode_task", label), &task, |b, bytes| {
            b.iter(|| wire::decode(black_box(bytes)).map(|m| m.body_len()))
        });
        group.bench_with_input(
            BenchmarkId::new("decode_task_keyed", label),
            &keyed,
            |b, bytes| b.iter(|| wire::decode(black_box(bytes)).map(|m| m.body_len())),
        );
        group.bench_with_input(BenchmarkId::new("decode_done", label), &done, |b, bytes| {
            b.iter(|| wire::decode(black_box(bytes)).map(|m| m.body_len()))
        });
        // `Message::encode` of a message that carries a body (the decoded offer, re-encoded).
        let decoded = wire::decode(&task).expect("decodes");
        group.bench_with_input(
            BenchmarkId::new("reencode_task", label),
            &decoded,
            |b, m| b.iter(|| black_box(m).encode()),
        );
    }
    group.throughput(Throughput::Elements(1));
    let cancel = wire::encode_cancel();
    group.bench_function("encode_cancel", |b| b.iter(wire::encode_cancel));
    group.bench_function("decode_cancel", |b| {
        b.iter(|| wire::decode(black_box(&cancel)).map(|m| m.body_len()))
    });
    group.finish();
}

fn task_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("task_key");
    for (size, label) in SIZES {
        let body = payload(size);
        assert_eq!(
            wire::extract_key_value(&body, "user").expect("has it"),
            "v42"
        );
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("extract", label), &body, |b, body| {
            b.iter(|| wire::extract_key_value(black_box(body), black_box("user")))
        });
        // The creator's whole keyed path: extract, validate, encode with the value.
        group.bench_with_input(
            BenchmarkId::new("extract_validate_encode", label),
            &body,
            |b, body| {
                b.iter(|| {
                    let value = wire::extract_key_value(black_box(body), "user")?;
                    validate_name("task key value", &value)?;
                    wire::encode_task("bench", Some(&value), body)
                })
            },
        );
    }
    group.finish();
}

fn names(c: &mut Criterion) {
    let mut group = c.benchmark_group("names");
    let ns = Namespace::default();
    let id = random_id();
    group.bench_function("random_id", |b| b.iter(random_id));
    group.bench_function("id_to_hex", |b| {
        b.iter(|| id_to_hex(black_box(u128::MAX / 3)))
    });
    group.bench_function("namespace_new", |b| {
        b.iter(|| Namespace::new(black_box("my-app_1")))
    });
    group.bench_function("validate_name/short", |b| {
        b.iter(|| validate_name("task", black_box("resize.image")))
    });
    let long = "é".repeat(256); // 512 bytes, the limit
    group.bench_function("validate_name/512B", |b| {
        b.iter(|| validate_name("task", black_box(&long)))
    });
    group.bench_function("task_channel", |b| {
        b.iter(|| black_box(&ns).task_channel(black_box("resize.image")))
    });
    group.bench_function("reply_channel", |b| {
        b.iter(|| black_box(&ns).reply_channel(black_box(&id)))
    });
    group.bench_function("claim_key", |b| {
        b.iter(|| black_box(&ns).claim_key(black_box(&id)))
    });
    group.bench_function("limit_key", |b| {
        b.iter(|| black_box(&ns).limit_key(black_box("resize.image"), black_box("v42")))
    });
    group.finish();
}

/// Every group, configured from the command line (`criterion_group!` without its undocumented
/// `pub fn`, which `missing_docs` rejects).
fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    envelope(&mut criterion);
    task_key(&mut criterion);
    names(&mut criterion);
}

criterion_main!(benches);
