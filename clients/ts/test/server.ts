// Starts a real Python orcd worker for the tests, unless ORCD_ADDRESS names one already running
// (clients/ci.sh starts one and shares it between the TypeScript and Go tests).
import { ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

import { connect } from "../src/index";

// dist/test -> dist -> clients/ts -> clients -> repository root
const REPO = process.env.ORCD_REPO ?? path.resolve(__dirname, "..", "..", "..", "..");

export interface TestServer {
  address: string;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

function modelArg(): string {
  if (process.env.ORCD_MODEL) return process.env.ORCD_MODEL;
  const cached = path.join(os.homedir(), ".cache", "orcd", "models", "smollm2-135m-instruct.gguf");
  // The server also accepts a model name, which it resolves (and fetches) itself.
  return fs.existsSync(cached) ? cached : "smollm2-135m-instruct";
}

export async function startServer(): Promise<TestServer> {
  if (process.env.ORCD_ADDRESS) {
    return { address: process.env.ORCD_ADDRESS, stop: async () => {} };
  }
  const port = await freePort();
  const python = process.env.ORCD_PYTHON ?? "python3";
  const args = ["-m", "orcd_grpc.cli", "serve", "--host", "127.0.0.1", "--port", String(port),
    "--model", modelArg(), "--backend", "cpu"];
  const child: ChildProcess = spawn(python, args, { cwd: REPO, stdio: ["ignore", "ignore", "pipe"] });
  // Keep the tail of the worker's JSON log so a failed start says why.
  let log = "";
  child.stderr!.on("data", (b: Buffer) => {
    log = (log + b.toString()).slice(-4000);
  });
  let exited: string | undefined;
  child.once("exit", (code, sig) => {
    exited = `worker exited (code ${code}, signal ${sig})`;
  });

  const address = `127.0.0.1:${port}`;
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await gone;
    clearTimeout(t);
  };

  const client = connect(address);
  const timeoutMs = Number(process.env.ORCD_START_TIMEOUT_MS ?? 180_000);
  try {
    await Promise.race([
      client.waitForServing(timeoutMs),
      new Promise<never>((_, reject) => {
        const poll = setInterval(() => {
          if (exited) {
            clearInterval(poll);
            reject(new Error(exited));
          }
        }, 200);
        child.once("exit", () => setTimeout(() => clearInterval(poll), 300));
      }),
    ]);
  } catch (e) {
    await stop();
    throw new Error(`${(e as Error).message}\n--- worker log tail ---\n${log}`);
  } finally {
    client.close();
  }
  return { address, stop };
}
