// Command orcd-example streams one greedy completion from an orcd worker and prints it.
//
//	orcd-example -addr 127.0.0.1:50051 -prompt "The capital of France is" -max-tokens 16
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"orcd/client"
	orcdv1 "orcd/gen/orcdv1"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "worker address, host:port")
	prompt := flag.String("prompt", "The capital of France is", "prompt text")
	maxTokens := flag.Uint("max-tokens", 16, "most tokens to generate")
	flag.Parse()

	c, err := client.Dial(*addr)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	waitCtx, waitCancel := context.WithTimeout(ctx, 30*time.Second)
	defer waitCancel()
	if err := c.WaitForServing(waitCtx, 250*time.Millisecond); err != nil {
		log.Fatal(err)
	}

	temp := float32(0) // greedy
	req := &orcdv1.ExecuteRequest{
		Input:    &orcdv1.ExecuteRequest_Text{Text: *prompt},
		Sampling: &orcdv1.SamplingParams{Temperature: &temp},
		Stopping: &orcdv1.StoppingCriteria{MaxTokens: uint32(*maxTokens)},
	}
	fmt.Print(*prompt)
	res, err := c.Execute(ctx, req, func(ev *orcdv1.ExecuteResponse) error {
		if t := ev.GetToken(); t != nil {
			fmt.Print(t.GetText())
		}
		return nil
	})
	fmt.Println()
	if err != nil {
		log.Fatal(err)
	}
	f := res.Finished
	fmt.Fprintf(os.Stderr, "[%s: %d tokens, %.1f tok/s]\n",
		f.GetReason(), f.GetUsage().GetCompletionTokens(), f.GetTimings().GetDecodeTokensPerSecond())
}
