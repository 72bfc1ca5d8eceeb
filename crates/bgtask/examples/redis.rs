//! bgtask on Redis: a worker that reports progress, a creator that follows it, and a clean
//! shutdown (the program is in `shared/report.rs`, the same for every broker). The broker comes
//! from the configuration: `bgtask.toml` in the working directory, then `BGTASK_BROKER_URL`,
//! else `redis://127.0.0.1:6379`.
//!
//! ```text
//! docker compose up -d --wait redis      # or: redis-server --daemonize yes
//! cargo run -p bgtask --example redis
//! ```

#[path = "shared/report.rs"]
mod report;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    report::run("redis://127.0.0.1:6379").await
}
