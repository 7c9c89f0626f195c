// Streams one greedy completion and prints it as it arrives.
//   npm run build && node dist/examples/stream.js [host:port] [prompt] [max_tokens]
import { connect, FinishReason } from "../src/index";

async function main(): Promise<void> {
  const address = process.argv[2] ?? process.env.ORCD_ADDRESS ?? "127.0.0.1:50051";
  const prompt = process.argv[3] ?? "The capital of France is";
  const maxTokens = Number(process.argv[4] ?? 16);
  const client = connect(address);
  try {
    await client.waitForServing(30_000);
    for await (const ev of client.execute({
      text: prompt,
      sampling: { temperature: 0 },
      stopping: { maxTokens },
    })) {
      switch (ev.type) {
        case "started":
          process.stderr.write(`[request ${ev.started.requestId}, ${ev.started.promptTokens} prompt tokens]\n`);
          process.stdout.write(prompt);
          break;
        case "token":
          process.stdout.write(ev.token.text);
          break;
        case "finished": {
          const f = ev.finished;
          process.stdout.write("\n");
          process.stderr.write(
            `[${FinishReason[f.reason]}: ${f.usage?.completionTokens} tokens, ` +
              `${f.timings?.decodeTokensPerSecond.toFixed(1)} tok/s]\n`,
          );
        }
      }
    }
  } finally {
    client.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
