// A thin, hand-written layer over the ts-proto stubs in ../gen (made by `npm run generate`).
// It turns callbacks and Node streams into promises and async iterators, and turns Execute's
// oneof into a discriminated union so `switch (ev.type)` narrows the event type.
import {
  ChannelCredentials,
  ClientOptions,
  credentials as grpcCredentials,
  Metadata,
  ServiceError,
} from "@grpc/grpc-js";
import {
  CancelRequest,
  DeepPartial,
  ExecuteRequest,
  ExecuteResponse,
  Finished,
  HardwareInfoRequest,
  HardwareInfoResponse,
  ListModelsRequest,
  ModelDescription,
  PromptLogprobs,
  Started,
  Token,
  TokenizeRequest,
  TokenizeResponse,
  WorkerClient,
} from "../gen/orcd/v1/worker";
import {
  HealthCheckRequest,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthClient,
} from "../gen/health/v1/health";

// Everything the contract defines (messages, enums, the raw WorkerClient) is part of the API too.
export * from "../gen/orcd/v1/worker";
export { ServingStatus };

export type ExecuteEvent =
  | { type: "started"; started: Started }
  | { type: "token"; token: Token }
  | { type: "promptLogprobs"; promptLogprobs: PromptLogprobs }
  | { type: "finished"; finished: Finished };

export interface ConnectOptions {
  /** Channel credentials; plaintext (the worker's default) when unset. */
  credentials?: ChannelCredentials;
  /** Sent as "authorization: Bearer <token>" on every call, for workers with auth on. */
  token?: string;
  /** Extra grpc-js channel options. */
  channelOptions?: Partial<ClientOptions>;
}

export interface CallOpts {
  /** Absolute deadline; the worker cancels the request when it passes. */
  deadline?: Date;
  /** Aborting ends the call; the worker then cancels the request within one decode step. */
  signal?: AbortSignal;
  /** Extra request metadata, e.g. {"x-correlation-id": "..."}. */
  metadata?: Record<string, string>;
}

export class OrcdClient {
  readonly worker: WorkerClient;
  readonly healthClient: HealthClient;
  private readonly token?: string;

  constructor(address: string, opts: ConnectOptions = {}) {
    const creds = opts.credentials ?? grpcCredentials.createInsecure();
    this.worker = new WorkerClient(address, creds, opts.channelOptions);
    // Both stubs share grpc-js's channel pool (same address, credentials and options).
    this.healthClient = new HealthClient(address, creds, opts.channelOptions);
    this.token = opts.token;
  }

  /**
   * Runs one request and yields its events: Started, then (with promptLogprobs set) the prompt's
   * PromptLogprobs chunks, then Token per token, then Finished (one per sample with n > 1, each
   * event carrying its sampleIndex).
   * Leaving the loop early (break, throw) cancels the call, so the worker stops generating.
   * A gRPC error status is thrown as a grpc-js ServiceError (with .code and .details).
   */
  async *execute(request: DeepPartial<ExecuteRequest>, opts: CallOpts = {}): AsyncGenerator<ExecuteEvent> {
    const call = this.worker.execute(ExecuteRequest.fromPartial(request), this.metadata(opts.metadata), {
      deadline: opts.deadline,
    });
    const onAbort = () => call.cancel();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    let finished = false;
    try {
      for await (const msg of call as AsyncIterable<ExecuteResponse>) {
        if (msg.tokenBatch) {
          // coalesce_tokens: tokens that were ready together, one token event each as without it
          for (const token of msg.tokenBatch.tokens) yield { type: "token", token };
          continue;
        }
        const ev = toEvent(msg);
        if (ev === undefined) continue; // an event kind newer than this client: skip it
        if (ev.type === "finished") finished = true;
        yield ev;
      }
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      // Without this an abandoned iterator would leave the worker generating for nobody.
      if (!finished) call.cancel();
    }
  }

  /** Cancels a running or queued request; true when the worker was still running it. */
  cancel(requestId: string, opts: CallOpts = {}): Promise<boolean> {
    return new Promise((resolve, reject) => {
      this.worker.cancel(
        CancelRequest.fromPartial({ requestId }),
        this.metadata(opts.metadata),
        { deadline: opts.deadline },
        (err: ServiceError | null, res) => (err ? reject(err) : resolve(res.cancelled)),
      );
    });
  }

  /**
   * The model's token ids for `text` or `chat` messages, exactly as Execute would run them;
   * with returnOffsets, each token's byte span in the text.
   */
  tokenize(request: DeepPartial<TokenizeRequest>, opts: CallOpts = {}): Promise<TokenizeResponse> {
    return new Promise((resolve, reject) => {
      this.worker.tokenize(
        TokenizeRequest.fromPartial(request),
        this.metadata(opts.metadata),
        { deadline: opts.deadline },
        (err: ServiceError | null, res) => (err ? reject(err) : resolve(res)),
      );
    });
  }

  /**
   * Teacher-forced log-probs of a prompt, generating nothing: Execute with promptLogprobs on and
   * maxTokens 0. One entry per prompt position from 1 on (entries[i] scores prompt token i + 1);
   * topN alternatives at each.
   */
  async score(request: DeepPartial<ExecuteRequest>, topN = 0, opts: CallOpts = {}): Promise<PromptLogprobs["entries"]> {
    const entries: PromptLogprobs["entries"] = [];
    for await (const ev of this.execute(
      { ...request, promptLogprobs: { enabled: true, topN }, stopping: { ...request.stopping, maxTokens: 0 } },
      opts,
    )) {
      if (ev.type === "promptLogprobs") entries.push(...ev.promptLogprobs.entries);
    }
    return entries;
  }

  hardwareInfo(opts: CallOpts = {}): Promise<HardwareInfoResponse> {
    return new Promise((resolve, reject) => {
      this.worker.hardwareInfo(
        HardwareInfoRequest.fromPartial({}),
        this.metadata(opts.metadata),
        { deadline: opts.deadline },
        (err: ServiceError | null, res) => (err ? reject(err) : resolve(res)),
      );
    });
  }

  listModels(opts: CallOpts = {}): Promise<ModelDescription[]> {
    return new Promise((resolve, reject) => {
      this.worker.listModels(
        ListModelsRequest.fromPartial({}),
        this.metadata(opts.metadata),
        { deadline: opts.deadline },
        (err: ServiceError | null, res) => (err ? reject(err) : resolve(res.models)),
      );
    });
  }

  /** grpc.health.v1 Check; service "" is the worker as a whole (SERVING once a model is loaded). */
  health(service = "", opts: CallOpts = {}): Promise<ServingStatus> {
    return new Promise((resolve, reject) => {
      this.healthClient.check(
        HealthCheckRequest.fromPartial({ service }),
        this.metadata(opts.metadata),
        { deadline: opts.deadline ?? new Date(Date.now() + 5000) },
        (err: ServiceError | null, res) => (err ? reject(err) : resolve(res.status)),
      );
    });
  }

  /**
   * Polls health until SERVING. Connection errors count as "not yet" (the worker may still be
   * starting); throws when timeoutMs passes first.
   */
  async waitForServing(timeoutMs = 60_000, pollMs = 250): Promise<void> {
    const end = Date.now() + timeoutMs;
    let last: unknown = "no answer";
    while (Date.now() < end) {
      try {
        const s = await this.health("", { deadline: new Date(Math.min(end, Date.now() + 2000)) });
        if (s === ServingStatus.SERVING) return;
        last = ServingStatus[s] ?? s;
      } catch (e) {
        last = (e as Error).message;
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
    throw new Error(`worker not SERVING after ${timeoutMs} ms (last: ${String(last)})`);
  }

  close(): void {
    this.worker.close();
    this.healthClient.close();
  }

  private metadata(extra?: Record<string, string>): Metadata {
    const md = new Metadata();
    if (this.token) md.set("authorization", `Bearer ${this.token}`);
    for (const [k, v] of Object.entries(extra ?? {})) md.set(k, v);
    return md;
  }
}

/** Opens a client for a worker at "host:port". Channels connect lazily, on the first call. */
export function connect(address: string, opts: ConnectOptions = {}): OrcdClient {
  return new OrcdClient(address, opts);
}

function toEvent(msg: ExecuteResponse): ExecuteEvent | undefined {
  if (msg.started) return { type: "started", started: msg.started };
  if (msg.token) return { type: "token", token: msg.token };
  if (msg.promptLogprobs) return { type: "promptLogprobs", promptLogprobs: msg.promptLogprobs };
  if (msg.finished) return { type: "finished", finished: msg.finished };
  return undefined;
}
