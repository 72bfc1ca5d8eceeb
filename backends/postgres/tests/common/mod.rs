//! Helpers shared by the integration tests: the test server, schemas of their own, brokers,
//! raw connections.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use bgtask_postgres::{PostgresBroker, PostgresConfig};
use sqlx::{Connection, PgConnection};

/// `pg_notify(ident, text)` on `conn` (a connection or a transaction), as a raw peer would.
pub async fn notify<'c, E>(conn: E, ident: &str, text: &str)
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(ident)
        .bind(text)
        .execute(conn)
        .await
        .expect("pg_notify");
}

/// The environment variable naming the test server.
pub const URL_VAR: &str = "BGTASK_POSTGRES_URL";
/// The test server when the variable is not set.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How to get a server for the tests.
pub const HOW_TO_START: &str = "start PostgreSQL with a database `test` that user `postgres` \
     may use: `docker compose up -d postgres`, or `scripts/test` (which starts a local server), \
     or point BGTASK_POSTGRES_URL at a server";

/// The URL of the test server.
pub fn url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A schema of one test, dropped (with everything in it) when this is dropped. Brokers create
/// it when they first connect.
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    pub fn new() -> TestSchema {
        TestSchema {
            name: format!("bgtask_t{}", &bgtask_core::names::random_id()[..16]),
        }
    }

    /// The settings for a broker on this schema, with a small pool (tests open many brokers).
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig::new(url())
            .with_schema(&self.name)
            .with_pool_size(4)
    }

    /// A broker on this schema; panics with instructions when the server is unreachable.
    pub async fn broker(&self) -> PostgresBroker {
        connect(self.config()).await
    }

    /// Settings for a broker on this schema behind a fault proxy: short bounds so outages are
    /// noticed quickly.
    pub fn fault_config(&self, addr: SocketAddr) -> PostgresConfig {
        PostgresConfig::new(url_via(addr))
            .with_schema(&self.name)
            .with_pool_size(8)
            .with_op_timeout(Duration::from_secs(1))
            .with_connect_timeout(Duration::from_secs(1))
            .with_liveness_interval(Duration::from_secs(1))
            .with_max_backoff(Duration::from_secs(1))
    }

    /// The number of rows in this schema's `payloads` table.
    pub async fn payload_rows(&self) -> i64 {
        self.rows("payloads").await
    }

    /// The number of rows in this schema's `leases` table, expired ones included.
    pub async fn lease_rows(&self) -> i64 {
        self.rows("leases").await
    }

    /// The number of rows in this schema's `table`.
    async fn rows(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM \"{}\".{table}", self.name);
        sqlx::query_scalar(&sql)
            .fetch_one(&mut raw().await)
            .await
            .unwrap()
    }
}

impl TestSchema {
    /// The number of rows in this schema's `claims` table, expired ones included.
    pub async fn claim_rows(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM \"{}\".claims", self.name);
        sqlx::query_scalar(&sql)
            .fetch_one(&mut raw().await)
            .await
            .unwrap()
    }
}

impl Default for TestSchema {
    fn default() -> Self {
        TestSchema::new()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // On a thread of its own: this may run inside (or while shutting down) a runtime.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test schema");
            runtime.block_on(async move {
                let work = async {
                    let mut conn = PgConnection::connect(&url()).await?;
                    sqlx::query("SET lock_timeout = '10s'")
                        .execute(&mut conn)
                        .await?;
                    let drop = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                    // Brokers still running may hold row locks in another order: a deadlock
                    // aborts the drop, which is then tried again.
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        match sqlx::query(&drop).execute(&mut conn).await {
                            Ok(_) => break,
                            Err(e) if attempts < 10 => {
                                eprintln!("dropping test schema {name}: {e}; trying again");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    conn.close().await
                };
                match tokio::time::timeout(Duration::from_secs(20), work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("could not drop test schema {name}: {e}"),
                    Err(_) => eprintln!("dropping test schema {name} timed out"),
                }
            });
        });
        let _ = dropped.join();
    }
}

/// A broker with `config`; panics with instructions when the server is unreachable.
pub async fn connect(config: PostgresConfig) -> PostgresBroker {
    let shown = config.redacted_url();
    match PostgresBroker::connect_with(config).await {
        Ok(broker) => broker,
        Err(e) => panic!("cannot reach the test PostgreSQL at {shown}: {e}\n{HOW_TO_START}"),
    }
}

/// The test server's TCP address.
pub fn server_addr() -> SocketAddr {
    bgtask_conformance::servers::server_addr(&url(), URL_VAR, 5432)
}

/// The test server's URL with its host and port replaced by `addr`: how a broker reaches the
/// server through a fault proxy.
pub fn url_via(addr: SocketAddr) -> String {
    bgtask_conformance::servers::url_via(&url(), addr)
}

/// A plain connection for checking the server's side of things.
pub async fn raw() -> PgConnection {
    match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url())).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("cannot reach the test PostgreSQL: {e}\n{HOW_TO_START}"),
        Err(_) => panic!("the test PostgreSQL does not answer\n{HOW_TO_START}"),
    }
}

/// The backend pid of the listener connection of `broker`, from `pg_stat_activity`.
pub async fn listener_pid(broker: &PostgresBroker) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname IS NOT NULL",
    )
    .bind(broker.listener_application_name())
    .fetch_optional(&mut raw().await)
    .await
    .unwrap()
}
