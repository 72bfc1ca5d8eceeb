// A node-background-task 2.0.1 echo worker (for scripts/bench-vs-nbt): accepts every task
// offered on its task's broadcast channel and completes it with the task itself as the reply.
// Runs until SIGTERM/SIGINT.
//
//   BGTASK_NBT_DIR=target/nbt node scripts/nbt/worker.js --redis URL --namespace NS [--key k]
"use strict";

const { flags, nbtRequire, redisOptions } = require("./common");

const args = flags(process.argv.slice(2), { redis: "redis://127.0.0.1:6379", namespace: "", key: "k" });
if (!args.namespace) {
  console.error("worker.js: --namespace is required");
  process.exit(64);
}
const nbt = nbtRequire("background-task");

// isWorker: a TaskServer. `task` names the broadcast channel (`${task}Broadcast`) it listens on;
// taskKey gives it a blacklist store, as a keyed deployment would have.
const worker = nbt.connect({
  isWorker: true,
  task: args.namespace,
  taskKey: args.key,
  redisOptions: redisOptions(args.redis, args.namespace + ":"),
});

let done = 0, failed = 0;
worker.on("error", (e) => console.error("nbt worker error:", e && e.message ? e.message : e));
// TASK_AVAILABLE is a notification only: acceptTask fetches (and deletes) the payload, so the
// first worker to accept gets it. Its callback gets the task details, or an Error - a single
// argument, not (err, value).
worker.on("TASK_AVAILABLE", (id) => {
  worker.acceptTask(id, (task) => {
    if (task instanceof Error) {
      failed++;
      return;
    }
    try {
      worker.completeTask(id, "SUCCESS", task);
      done++;
    } catch (e) {
      failed++;
      console.error("nbt worker: completeTask failed:", e.message);
    }
  });
});

function stop() {
  if (failed) console.error(`nbt worker: ${done} tasks completed, ${failed} not accepted or completed`);
  worker.shutdown(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
