// Deletes the keys of one scripts/bench-vs-nbt run: SCAN MATCH 'NS:*' + DEL, nothing else.
//
//   BGTASK_NBT_DIR=target/nbt node scripts/nbt/cleanup.js --redis URL --namespace NS
"use strict";

const { flags, nbtRequire, redisOptions } = require("./common");

const args = flags(process.argv.slice(2), { redis: "redis://127.0.0.1:6379", namespace: "" });
if (!/^[A-Za-z0-9_.-]+$/.test(args.namespace)) {
  console.error("cleanup.js: --namespace must be a non-empty [A-Za-z0-9_.-]+ string");
  process.exit(64);
}
const Redis = nbtRequire("ioredis");
const redis = new Redis(redisOptions(args.redis));
redis.on("error", () => {});
// ioredis retries an unreachable server forever: give up after 10 s.
setTimeout(() => {
  console.error(`nbt cleanup: Redis at ${args.redis} unreachable, keys ${args.namespace}:* not deleted`);
  process.exit(1);
}, 10000).unref();

async function main() {
  let cursor = "0", deleted = 0;
  do {
    const [next, keys] = await redis.scan(cursor, "MATCH", args.namespace + ":*", "COUNT", 1000);
    cursor = next;
    if (keys.length) deleted += await redis.del(...keys);
  } while (cursor !== "0");
  return deleted;
}

main().then(
  (n) => {
    if (n) console.error(`nbt cleanup: deleted ${n} key(s) under ${args.namespace}:`);
    redis.disconnect();
  },
  (e) => {
    console.error("nbt cleanup failed:", e.message);
    redis.disconnect();
    process.exitCode = 1;
  },
);
