// Streams one greedy completion and prints it as it arrives.
//   npm run build && node dist/examples/stream.js [host:port] [prompt]
import { connect, FinishReason } from "../src/index";

async function main(): Promise<void> {
  const address = process.argv[2] ?? process.env.ORCD_ADDRESS ?? "127.0.0.1:50051";
  const prompt = process.argv[3] ?? "The capital of France is";
  const client = connect(address);
  try {
    await client.waitForServing(30_000);
    for await (const ev of client.execute({
      text: prompt,
      sampling: { temperature: 0 },
      stopping: { maxTokens: 16 },
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
