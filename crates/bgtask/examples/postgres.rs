//! bgtask on PostgreSQL: a worker that reports progress, a creator that follows it, and a clean
//! shutdown (the program is in `shared/report.rs`, the same for every broker). The broker comes
//! from the configuration: `bgtask.toml` in the working directory, then `BGTASK_BROKER_URL`,
//! else `postgres://postgres@127.0.0.1:5432/test`.
//!
//! ```text
//! docker compose up -d --wait postgres   # or a local server, user postgres, trust auth
//! cargo run -p bgtask --features postgres --example postgres
//! ```

#[path = "shared/report.rs"]
mod report;

#[tokio::main]
async fn main() -> bgtask::Result<()> {
    report::run("postgres://postgres@127.0.0.1:5432/test").await
}
