// Shared by worker.js, creator.js and cleanup.js (helpers of scripts/bench-vs-nbt): flags, the
// node_modules of the scratch install of background-task@2.0.1, and ioredis options.
"use strict";

const path = require("path");
const { createRequire } = require("module");

/** `--name value` pairs into an object (values are strings). */
function flags(argv, defaults) {
  const out = Object.assign({}, defaults);
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "");
    if (!(name in out) || i + 1 >= argv.length) {
      console.error(`${path.basename(process.argv[1])}: unknown flag or missing value: ${argv[i]}`);
      process.exit(64);
    }
    out[name] = argv[i + 1];
  }
  return out;
}

/** require() from the scratch install ($BGTASK_NBT_DIR/node_modules), not from scripts/. */
function nbtRequire(name) {
  const dir = process.env.BGTASK_NBT_DIR;
  if (!dir) {
    console.error("BGTASK_NBT_DIR is not set (scripts/bench-vs-nbt sets it)");
    process.exit(64);
  }
  return createRequire(path.join(path.resolve(dir), "index.js"))(name);
}

/**
 * ioredis 2.4.2 options for a redis:// URL. `prefix` becomes ioredis's keyPrefix: every key of
 * every command nbt sends gets it, so each run has its own keys (nbt has no namespace option of
 * its own). keyPrefix does not apply to pub/sub channel names nor to KEYS/SCAN patterns.
 */
function redisOptions(url, prefix) {
  const u = new URL(url);
  if (u.protocol !== "redis:") {
    console.error(`only redis:// URLs are supported, not ${url}`);
    process.exit(64);
  }
  const o = { host: u.hostname || "127.0.0.1", port: Number(u.port || 6379) };
  if (u.password) o.password = decodeURIComponent(u.password);
  const db = u.pathname.replace(/^\//, "");
  if (db) o.db = Number(db);
  if (prefix) o.keyPrefix = prefix;
  return o;
}

module.exports = { flags, nbtRequire, redisOptions };
