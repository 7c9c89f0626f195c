// Live tests: a real orcd worker over a real socket (see server.ts), driven through the wrapper.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { connect, ExecuteEvent, FinishReason, OrcdClient, ServingStatus } from "../src/index";
import { startServer, TestServer } from "./server";

let server: TestServer;
let client: OrcdClient;

before(async () => {
  server = await startServer();
  client = connect(server.address);
}, { timeout: 240_000 });

after(async () => {
  client?.close();
  await server?.stop();
});

// Polls Cancel until the worker says NOT_FOUND (gRPC code 5): the request is no longer running.
async function waitUntilGone(requestId: string, withinMs: number): Promise<void> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    try {
      await client.cancel(requestId);
    } catch (e) {
      assert.equal((e as { code?: number }).code, 5, `unexpected error: ${(e as Error).message}`);
      return;
    }
    assert.ok(Date.now() < deadline, `request ${requestId} still known ${withinMs} ms later`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function collect(it: AsyncIterable<ExecuteEvent>): Promise<ExecuteEvent[]> {
  const out: ExecuteEvent[] = [];
  for await (const ev of it) out.push(ev);
  return out;
}

test("health reports SERVING once the model is loaded", async () => {
  assert.equal(await client.health(), ServingStatus.SERVING);
});

test("execute streams Started, tokens, then Finished(LENGTH) with greedy 'Paris'", { timeout: 120_000 }, async () => {
  const maxTokens = 8;
  const events = await collect(
    client.execute({
      text: "The capital of France is",
      sampling: { temperature: 0 },
      stopping: { maxTokens },
    }),
  );
  assert.ok(events.length >= 3, `too few events: ${events.length}`);
  const first = events[0];
  const last = events[events.length - 1];
  assert.equal(first.type, "started");
  assert.equal(last.type, "finished");
  const tokens = events.slice(1, -1);
  assert.ok(tokens.length >= 1);
  assert.ok(tokens.every((e) => e.type === "token"), "only Token events between Started and Finished");
  if (first.type !== "started" || last.type !== "finished") throw new Error("unreachable");
  assert.ok(first.started.requestId.length > 0, "server fills in a request id");
  assert.ok(first.started.promptTokens > 0);
  assert.equal(last.finished.reason, FinishReason.FINISH_REASON_LENGTH);
  assert.equal(last.finished.usage?.completionTokens, maxTokens);
  assert.equal(tokens.length, maxTokens, "one Token event per generated token");
  tokens.forEach((e, i) => e.type === "token" && assert.equal(e.token.index, i));
  const text = tokens.map((e) => (e.type === "token" ? e.token.text : "")).join("");
  assert.match(text, /Paris/, `greedy completion was ${JSON.stringify(text)}`);
});

test("cancel after the first token ends the stream with CANCELLED", { timeout: 120_000 }, async () => {
  const requestId = `ts-cancel-${process.pid}-${Date.now()}`;
  let tokens = 0;
  let cancelled: boolean | undefined;
  let finished: ExecuteEvent | undefined;
  for await (const ev of client.execute({
    requestId,
    text: "Write a long story about a dragon.",
    sampling: { temperature: 0 },
    stopping: { maxTokens: 200, ignoreEos: true },
  })) {
    if (ev.type === "started") assert.equal(ev.started.requestId, requestId);
    if (ev.type === "token" && ++tokens === 1) cancelled = await client.cancel(requestId);
    if (ev.type === "finished") finished = ev;
  }
  assert.equal(cancelled, true, "Cancel found the running request");
  assert.ok(finished && finished.type === "finished");
  assert.equal(finished.finished.reason, FinishReason.FINISH_REASON_CANCELLED);
  assert.ok(tokens < 200, `generation ran to the end (${tokens} tokens) despite Cancel`);
  // Finished means done: the request leaves the worker's table, so Cancel turns NOT_FOUND.
  await waitUntilGone(requestId, 5_000);
});

test("hardwareInfo describes the CPU backend", async () => {
  const hw = await client.hardwareInfo();
  assert.equal(hw.backend, "cpu");
  assert.ok((hw.cpu?.cores ?? 0) > 0, "cpu.cores > 0");
  assert.ok(hw.ramTotalBytes > 0);
  assert.ok(hw.build?.version, "build.version is set");
});

test("breaking out of execute cancels the call on the worker", { timeout: 120_000 }, async () => {
  const requestId = `ts-break-${process.pid}-${Date.now()}`;
  for await (const ev of client.execute({
    requestId,
    text: "Count to one thousand:",
    sampling: { temperature: 0 },
    stopping: { maxTokens: 200, ignoreEos: true },
  })) {
    if (ev.type === "token") break;
  }
  // The worker drops the request within a decode step of noticing the call has gone.
  await waitUntilGone(requestId, 30_000);
});

test("tokenize gives the prompt's ids and byte offsets that cover the text", async () => {
  const text = "The capital of France is Paris.";
  const res = await client.tokenize({ text, returnOffsets: true });
  assert.ok(res.ids.length >= 5, `too few ids: ${res.ids}`);
  assert.equal(res.offsets.length, res.ids.length, "one offset per id");
  const spans = res.offsets.filter((o) => o.end > o.start);
  assert.equal(spans[0].start, 0);
  assert.equal(spans[spans.length - 1].end, Buffer.byteLength(text));
  // The ids are the prompt Execute runs: Started.promptTokens counts them.
  const events = await collect(client.execute({ text, stopping: { maxTokens: 1 } }));
  const started = events[0];
  assert.ok(started.type === "started");
  assert.equal(started.started.promptTokens, res.ids.length);
  await assert.rejects(client.tokenize({ text: "" }), (e: { code?: number }) => e.code === 3);
});

test("score: prompt logprobs with maxTokens 0, one finite negative entry per position after the first", { timeout: 120_000 }, async () => {
  const text = "The quick brown fox jumps over the lazy dog.";
  const ids = (await client.tokenize({ text })).ids;
  const entries = await client.score({ text }, 2);
  assert.equal(entries.length, ids.length - 1);
  entries.forEach((e, i) => {
    assert.equal(e.tokenId, ids[i + 1], `entry ${i} scores prompt token ${i + 1}`);
    assert.ok(Number.isFinite(e.logprob) && e.logprob < 0, `logprob ${e.logprob}`);
    assert.equal(e.topLogprobs.length, 2);
    assert.ok(e.topLogprobs[0].logprob >= e.logprob - 1e-4, "the top alternative is at least as likely");
  });
  // Nothing is generated: no Token events, Finished with zero completion tokens.
  const events = await collect(
    client.execute({ text, promptLogprobs: { enabled: true, topN: 0 }, stopping: { maxTokens: 0 } }),
  );
  assert.ok(!events.some((e) => e.type === "token"));
  const last = events[events.length - 1];
  assert.ok(last.type === "finished");
  assert.equal(last.finished.usage?.completionTokens, 0);
});

test("constraint.regex: the output fullmatches [0-9]{3}", { timeout: 120_000 }, async () => {
  const events = await collect(
    client.execute({
      text: "Pick a number:",
      sampling: { temperature: 1, seed: 3 },
      stopping: { maxTokens: 16 },
      constraint: { regex: "[0-9]{3}" },
    }),
  );
  const text = events.map((e) => (e.type === "token" ? e.token.text : "")).join("");
  assert.match(text, /^[0-9]{3}$/, `constrained output was ${JSON.stringify(text)}`);
  const last = events[events.length - 1];
  assert.ok(last.type === "finished");
  assert.notEqual(last.finished.reason, FinishReason.FINISH_REASON_LENGTH, "the grammar ended the output");
});
