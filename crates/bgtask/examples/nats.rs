//! bgtask on NATS: a worker that reports progress, a creator that follows it, and a clean
//! shutdown (the program is in `shared/report.rs`, the same for every broker). The broker comes
//! from the configuration: `bgtask.toml` in the working directory, then `BGTASK_BROKER_URL`,
//! else `nats://127.0.0.1:4222`.
//!
//! ```text
//! docker compose up -d --wait nats       # or: nats-server -js
//! cargo run -p bgtask --features nats --example nats
//! ```

#[path = "shared/report.rs"]
mod report;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    report::run("nats://127.0.0.1:4222").await
}
