// The node-background-task 2.0.1 load generator (for scripts/bench-vs-nbt): submits --tasks keyed
// tasks, at most --concurrency in flight, to the echo worker of worker.js (same --namespace),
// and prints one JSON line: tasks_per_second, p50_ms, p99_ms, ok, errors (plus details).
// Exits 0 when every task succeeded, 70 otherwise (as `bgtask bench` does).
//
//   BGTASK_NBT_DIR=target/nbt node scripts/nbt/creator.js --redis URL --namespace NS \
//     --tasks 20000 --concurrency 64 --key k --key-values 10000 --payload 128
"use strict";

const { flags, nbtRequire, redisOptions } = require("./common");

const args = flags(process.argv.slice(2), {
  redis: "redis://127.0.0.1:6379", namespace: "", tasks: "10000", concurrency: "64",
  key: "k", "key-values": "10000", payload: "128", timeout: "30000", "ready-timeout": "15000",
  warmup: "0",
});
const tasks = Number(args.tasks), concurrency = Number(args.concurrency);
const keyValues = Number(args["key-values"]), timeout = Number(args.timeout);
if (!args.namespace || !(tasks >= 1) || !(concurrency >= 1) || !(keyValues >= 1)) {
  console.error("creator.js: needs --namespace, and --tasks, --concurrency, --key-values >= 1");
  process.exit(64);
}
const nbt = nbtRequire("background-task");
const Redis = nbtRequire("ioredis");

// The payloads, as `bgtask bench --key k --payload 128` makes them: {"k":"v<i>","data":"xx…"},
// task 0 padded to exactly --payload bytes, value i % --key-values for task i.
const pad = "x".repeat(Math.max(0, Number(args.payload) - JSON.stringify({ [args.key]: "v0", data: "" }).length));
const payloads = [];
for (let i = 0; i < Math.min(keyValues, tasks); i++) payloads.push({ [args.key]: "v" + i, data: pad });

// A TaskClient (isWorker unset). taskKey makes every addTask keyed: a blacklist check (GET
// blacklist:globalBlacklist:<value>), then the per-key limit (LLEN taskKey:<value>, refused with
// "Too many tasks" at maxTasksPerKey, else LPUSH the hostname; LREM when the reply arrives).
// maxTasksPerKey is left at its default, 5 when a taskKey is given: with 10,000 values used in
// turn and at most 1,024 tasks in flight, a value has one task in flight, so the limit is checked
// on every task but never hit. Without a taskKey nbt refuses tasks ("Missing taskKey"): it has
// no unkeyed mode. timeout: 30 s per task, bgtask bench's default (nbt's own is 5 s).
// `task` names the worker's broadcast channel (`${task}Broadcast`); replies come on a channel of
// this client's own. Payloads live in the hashes newtask:normal and success:normal, under the
// keyPrefix. At start the client removes its host's stale limit entries: KEYS taskKey:* (a
// pattern, so not prefixed: it scans the whole server once), LREM on the prefixed keys.
const client = nbt.connect({
  task: args.namespace,
  taskKey: args.key,
  timeout,
  redisOptions: redisOptions(args.redis, args.namespace + ":"),
});
const errors = {};
let clientErrors = 0;
const count = (kind) => { errors[kind] = (errors[kind] || 0) + 1; };
client.on("error", (e) => {
  clientErrors++;
  if (clientErrors <= 5) console.error("nbt client error:", e && e.message ? e.message : e);
});

// nbt has no "ready" callback, and pub/sub drops messages nobody listens to: wait until the
// worker listens on the broadcast channel and this client on its reply channel (not measured).
const admin = new Redis(redisOptions(args.redis));
admin.on("error", () => {});
const broadcast = args.namespace + "Broadcast";
async function ready() {
  const deadline = Date.now() + Number(args["ready-timeout"]);
  // ioredis retries an unreachable server forever, holding the commands: give up at the deadline.
  const stuck = setTimeout(() => {
    console.error(`creator.js: Redis at ${args.redis} or the nbt worker not ready within ${args["ready-timeout"]} ms`);
    process.exit(1);
  }, Number(args["ready-timeout"]) + 1000);
  for (;;) {
    const listen = client.notificationBus.listenChannel;
    const r = await admin.pubsub("numsub", broadcast, listen);
    if (Number(r[1]) >= 1 && Number(r[3]) >= 1) return clearTimeout(stuck);
    if (Date.now() > deadline) {
      throw new Error(`no nbt worker on channel ${broadcast} (subscribers ${r[1]}) or client not subscribed (${r[3]})`);
    }
    await new Promise((res) => setTimeout(res, 20));
  }
}

function quantile(sorted, q) {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}
const r3 = (x) => Math.round(x * 1000) / 1000;

function run(tasks) {
  return new Promise((resolve) => {
    const latencies = [];
    let next = 0, finished = 0;
    const started = process.hrtime.bigint();
    const submit = () => {
      const i = next++;
      const payload = payloads[i % payloads.length];
      const t0 = process.hrtime.bigint();
      let called = false;
      // addTask(task, [options], completion(id, reply), [progress]): reply is the worker's
      // completeTask message, or an Error (timeout, "Too many tasks", "Blacklisted", ...).
      client.addTask(payload, (id, reply) => {
        if (called) return count("duplicate completion");
        called = true;
        if (reply instanceof Error) count(reply.message || "error");
        else if (!reply || reply[args.key] !== payload[args.key]) count("wrong reply");
        else latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
        finished++;
        if (next < tasks) submit();
        else if (finished === tasks) resolve({ latencies, seconds: Number(process.hrtime.bigint() - started) / 1e9 });
      });
    };
    for (let k = 0; k < Math.min(concurrency, tasks); k++) submit();
  });
}

(async () => {
  await ready();
  await new Promise((res) => setTimeout(res, 100));
  // --warmup tasks first, not measured (JIT compilation, connection buffers).
  if (Number(args.warmup) > 0) await run(Number(args.warmup));
  const warmupErrors = Object.assign({}, errors);
  for (const k of Object.keys(errors)) delete errors[k];
  const { latencies, seconds } = await run(tasks);
  latencies.sort((a, b) => a - b);
  const failed = Object.values(errors).reduce((a, b) => a + b, 0);
  const parser = client.notificationBus.pubClient.client.replyParser;
  console.log(JSON.stringify({
    tasks_per_second: Math.round((latencies.length / seconds) * 10) / 10,
    p50_ms: r3(quantile(latencies, 0.5)),
    p99_ms: r3(quantile(latencies, 0.99)),
    p90_ms: r3(quantile(latencies, 0.9)),
    max_ms: r3(quantile(latencies, 1)),
    mean_ms: r3(latencies.reduce((a, b) => a + b, 0) / Math.max(1, latencies.length)),
    ok: latencies.length,
    errors: failed,
    error_kinds: errors,
    warmup_errors: warmupErrors,
    client_errors: clientErrors,
    seconds: r3(seconds),
    tasks, concurrency, key_values: keyValues,
    payload_bytes: JSON.stringify(payloads[0]).length,
    redis_parser: parser && parser.name,
  }));
  client.shutdown(() => {});
  admin.disconnect();
  const warmupFailed = Object.keys(warmupErrors).length > 0;
  setTimeout(() => process.exit(failed || warmupFailed || clientErrors ? 70 : 0), 50);
})().catch((e) => {
  console.error("creator.js:", e.message);
  process.exit(1);
});
