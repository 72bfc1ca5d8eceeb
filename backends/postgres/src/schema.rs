//! The tables, the lease function and the migrations that create them, and every statement the
//! broker runs. `{s}` in a template stands for the quoted schema name; everything else a
//! statement needs is a bind parameter.

use sqlx::{Connection, Executor, PgConnection};

use sha2::{Digest, Sha256};

/// The migrations, in order: `(version, description, SQL)`. Applied once each, in one
/// transaction under a transaction-scoped advisory lock, and recorded in `{s}.migrations`.
/// Never edit one that was released; add a new one.
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "leases, payloads and the lease function",
        r#"
CREATE TABLE {s}.leases (
    key_hash   bytea       GENERATED ALWAYS AS (sha256(key)) STORED,
    key        bytea       NOT NULL,
    id         text        NOT NULL,
    note       bytea       NOT NULL,
    seq        bigint      GENERATED ALWAYS AS IDENTITY,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key_hash, id)
);
CREATE INDEX leases_expires_at ON {s}.leases (expires_at);
COMMENT ON TABLE {s}.leases IS
    'bgtask leases: one row per live lease of a key (UTF-8 bytes); expired rows are deleted by acquire_lease and the brokers'' periodic cleanup';

CREATE TABLE {s}.payloads (
    id         text        PRIMARY KEY,
    channel    bytea       NOT NULL,
    data       bytea       NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX payloads_expires_at ON {s}.payloads (expires_at);
COMMENT ON TABLE {s}.payloads IS
    'bgtask messages too large for one NOTIFY, read by subscribers by id; deleted by the brokers'' periodic cleanup after expires_at';

CREATE FUNCTION {s}.acquire_lease(
    p_key bytea, p_id text, p_note bytea, p_ttl_ms bigint, p_cap bigint,
    OUT granted boolean, OUT live bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_hash bytea := sha256(p_key);
    v_now  timestamptz;
BEGIN
    -- One acquirer per key at a time, until this transaction ends; being VOLATILE, every
    -- statement below takes a fresh snapshot, so it sees what the previous holder committed.
    PERFORM pg_advisory_xact_lock(hashtextextended({lit} || ':' || encode(v_hash, 'hex'), 0));
    v_now := clock_timestamp();
    DELETE FROM {s}.leases l WHERE l.key_hash = v_hash AND l.key = p_key AND l.expires_at <= v_now;
    SELECT count(*) INTO live FROM {s}.leases l WHERE l.key_hash = v_hash AND l.key = p_key;
    IF p_cap IS NULL OR live < p_cap THEN
        INSERT INTO {s}.leases (key, id, note, expires_at)
            VALUES (p_key, p_id, p_note, v_now + p_ttl_ms * interval '1 millisecond');
        granted := true;
        live := live + 1;
    ELSE
        granted := false;
    END IF;
END
$fn$;
"#,
    ),
    (
        2,
        "claims",
        r#"
CREATE TABLE {s}.claims (
    key_hash   bytea       GENERATED ALWAYS AS (sha256(key)) STORED PRIMARY KEY,
    key        bytea       NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX claims_expires_at ON {s}.claims (expires_at);
COMMENT ON TABLE {s}.claims IS
    'bgtask claims: one row per claimed key (UTF-8 bytes), taken over once expired; expired rows are deleted by the brokers'' periodic cleanup';
"#,
    ),
    (
        3,
        "admit_lease: the blacklist check and the limit lease in one call",
        r#"
CREATE FUNCTION {s}.admit_lease(
    p_flag bytea, p_key bytea, p_id text, p_note bytea, p_ttl_ms bigint, p_cap bigint,
    OUT flag_id text, OUT flag_note bytea, OUT flag_left float8,
    OUT granted boolean, OUT live bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- A live flag refuses, with its oldest lease; no lease is taken.
    SELECT l.id, l.note, extract(epoch FROM l.expires_at - clock_timestamp())::float8
        INTO flag_id, flag_note, flag_left
        FROM {s}.leases l
        WHERE l.key_hash = sha256(p_flag) AND l.key = p_flag AND l.expires_at > clock_timestamp()
        ORDER BY l.seq
        LIMIT 1;
    IF flag_id IS NOT NULL THEN
        granted := false;
        RETURN;
    END IF;
    SELECT a.granted, a.live INTO granted, live
        FROM {s}.acquire_lease(p_key, p_id, p_note, p_ttl_ms, p_cap) a;
END
$fn$;
"#,
    ),
];

/// The latest migration version.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Fill in a template for `schema`.
fn render(template: &str, schema: &str) -> String {
    template
        .replace("{s}", &quote_ident(schema))
        .replace("{lit}", &quote_literal(schema))
}

/// The advisory lock key that serializes migrations of `schema`.
fn migration_lock(schema: &str) -> i64 {
    let digest = Sha256::digest(format!("bgtask-postgres migrations {schema}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Bring `schema` up to date on `conn`. Returns the versions applied (empty when it was up to
/// date already).
pub(crate) async fn migrate(conn: &mut PgConnection, schema: &str) -> sqlx::Result<Vec<i32>> {
    let versions = format!(
        "SELECT max(version) FROM {}.migrations",
        quote_ident(schema)
    );
    // Fast path without a lock or any privilege beyond reading: already up to date.
    if let Ok(Some(current)) = sqlx::query_scalar::<_, Option<i32>>(&versions)
        .fetch_one(&mut *conn)
        .await
    {
        if current >= latest_version() {
            return Ok(Vec::new());
        }
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(migration_lock(schema))
        .execute(&mut *tx)
        .await?;
    // Several statements without parameters: the simple query protocol.
    let setup = render(
        "CREATE SCHEMA IF NOT EXISTS {s}; \
         CREATE TABLE IF NOT EXISTS {s}.migrations ( \
             version integer PRIMARY KEY, \
             description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        schema,
    );
    tx.execute(setup.as_str()).await?;
    let current = sqlx::query_scalar::<_, Option<i32>>(&versions)
        .fetch_one(&mut *tx)
        .await?
        .unwrap_or(0);
    let mut applied = Vec::new();
    for (version, description, sql) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        let sql = render(sql, schema);
        tx.execute(sql.as_str()).await?;
        sqlx::query(&render(
            "INSERT INTO {s}.migrations (version, description) VALUES ($1, $2)",
            schema,
        ))
        .bind(version)
        .bind(description)
        .execute(&mut *tx)
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Every statement the broker runs, rendered for one schema.
#[derive(Debug)]
pub(crate) struct Statements {
    /// `$1` channel identifier, `$2` notification text.
    pub(crate) notify: String,
    /// `$1` id, `$2` channel bytes, `$3` data, `$4` ttl in ms, `$5` identifier, `$6` text.
    pub(crate) notify_by_reference: String,
    /// `$1` id, `$2` channel bytes → `data` when the row is that channel's, NULL otherwise.
    pub(crate) fetch_payload: String,
    /// `$1` flag key or NULL, `$2` key, `$3` id, `$4` note, `$5` ttl in ms, `$6` cap or NULL,
    /// `$7` channel identifier or NULL, `$8` notification text or NULL → (flag id, flag note,
    /// flag seconds left, granted, live): a flag id when blacklisted. With no flag, a plain
    /// acquire; with a channel, its notification when granted (sent at commit, after the insert).
    pub(crate) admit: String,
    /// `$1` key, `$2` id → one row (was it live?) if the lease existed.
    pub(crate) release: String,
    /// `$1` key, `$2` id, `$3` channel identifier, `$4` notification text → one row: was the
    /// lease live (NULL if it did not exist). The notification goes out at commit, after the
    /// delete.
    pub(crate) release_and_notify: String,
    /// `$1` key → (id, note, seconds left) of the live leases, oldest first.
    pub(crate) leases: String,
    /// `$1` key → the number of live leases.
    pub(crate) count: String,
    /// `$1` key prefix, `$2` the key to start after or NULL, `$3` most rows → (key, live
    /// leases) of the keys with live leases, in key order (a scan of the live leases).
    pub(crate) list_keys: String,
    /// `$1` key, `$2` ttl in ms → one row when the claim was taken, none when it is held.
    pub(crate) claim: String,
    /// → (lease rows deleted, payload rows deleted, claim rows deleted).
    pub(crate) cleanup: String,
}

impl Statements {
    pub(crate) fn new(schema: &str) -> Statements {
        let r = |t: &str| render(t, schema);
        Statements {
            notify: "SELECT pg_notify($1, $2)".to_owned(),
            notify_by_reference: r("WITH row AS ( \
                   INSERT INTO {s}.payloads (id, channel, data, expires_at) \
                   VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 millisecond') \
                   RETURNING id) \
                 SELECT pg_notify($5, $6) FROM row"),
            fetch_payload: r("SELECT CASE WHEN channel = $2 THEN data END \
                 FROM {s}.payloads WHERE id = $1"),
            // `pg_notify` returns `void`: as text, so that the row has only values sqlx reads.
            admit: r("SELECT flag_id, flag_note, flag_left, granted, live, \
                     (CASE WHEN granted AND $7::text IS NOT NULL \
                         THEN pg_notify($7, $8::text) END)::text IS NOT NULL \
                 FROM {s}.admit_lease($1, $2, $3, $4, $5, $6)"),
            release_and_notify: r("WITH released AS ( \
                     DELETE FROM {s}.leases \
                     WHERE key_hash = sha256($1) AND key = $1 AND id = $2 \
                     RETURNING expires_at > clock_timestamp() AS live) \
                 SELECT (SELECT live FROM released) FROM (SELECT pg_notify($3, $4)) AS sent"),
            release: r("DELETE FROM {s}.leases \
                 WHERE key_hash = sha256($1) AND key = $1 AND id = $2 \
                 RETURNING expires_at > clock_timestamp()"),
            leases: r("SELECT id, note, \
                     extract(epoch FROM expires_at - statement_timestamp())::float8 \
                 FROM {s}.leases \
                 WHERE key_hash = sha256($1) AND key = $1 AND expires_at > statement_timestamp() \
                 ORDER BY seq"),
            count: r("SELECT count(*) FROM {s}.leases \
                 WHERE key_hash = sha256($1) AND key = $1 AND expires_at > statement_timestamp()"),
            list_keys: r("SELECT key, count(*) FROM {s}.leases \
                 WHERE expires_at > statement_timestamp() \
                     AND substring(key FROM 1 FOR length($1)) = $1 \
                     AND ($2::bytea IS NULL OR key > $2) \
                 GROUP BY key ORDER BY key LIMIT $3"),
            // A live claim that the snapshot sees answers `false` with a read only; otherwise
            // the insert's arbiter index decides: one inserter wins, and the others wait for it
            // and find its row live, or take over an expired row (the row lock and the
            // re-check of its latest version let only one of them do it).
            claim: r("INSERT INTO {s}.claims AS c (key, expires_at) \
                 SELECT $1, clock_timestamp() + $2 * interval '1 millisecond' \
                 WHERE NOT EXISTS (SELECT FROM {s}.claims \
                     WHERE key_hash = sha256($1) AND expires_at > clock_timestamp()) \
                 ON CONFLICT (key_hash) DO UPDATE SET expires_at = EXCLUDED.expires_at \
                     WHERE c.expires_at <= clock_timestamp() \
                 RETURNING true"),
            cleanup: r("WITH leases AS ( \
                     DELETE FROM {s}.leases WHERE expires_at <= statement_timestamp() RETURNING 1), \
                 payloads AS ( \
                     DELETE FROM {s}.payloads WHERE expires_at <= statement_timestamp() RETURNING 1), \
                 claims AS ( \
                     DELETE FROM {s}.claims WHERE expires_at <= statement_timestamp() RETURNING 1) \
                 SELECT (SELECT count(*) FROM leases), (SELECT count(*) FROM payloads), \
                     (SELECT count(*) FROM claims)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_quote_the_schema() {
        assert_eq!(quote_ident("bg"), "\"bg\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(render("{s}.t {lit}", "Jobs"), "\"Jobs\".t 'Jobs'");
        let statements = Statements::new("x");
        assert!(statements.admit.contains("\"x\".admit_lease"));
        assert!(statements.claim.contains("\"x\".claims"));
        assert!(statements.cleanup.contains("\"x\".claims"));
        assert_eq!(latest_version(), 3);
        for (_, _, sql) in MIGRATIONS {
            let sql = render(sql, "x");
            assert!(!sql.contains("{s}") && !sql.contains("{lit}"));
        }
        assert_ne!(migration_lock("a"), migration_lock("b"));
    }
}
