// Live tests: a real orcd worker over a real socket. TestMain starts one (python -m
// orcd_grpc.cli serve, CPU backend, SmolLM2-135M) on a free port unless ORCD_ADDRESS names a
// running worker, as clients/ci.sh does to share one worker between the TS and Go tests.
package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	orcdv1 "orcd/gen/orcdv1"
)

var addr string

// tailBuffer keeps the last bytes of the worker's log, to explain a failed start.
type tailBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf.Write(p)
	if t.buf.Len() > 8192 {
		b := t.buf.Bytes()[t.buf.Len()-4096:]
		t.buf = *bytes.NewBuffer(append([]byte(nil), b...))
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func modelArg() string {
	if m := os.Getenv("ORCD_MODEL"); m != "" {
		return m
	}
	home, _ := os.UserHomeDir()
	cached := filepath.Join(home, ".cache", "orcd", "models", "smollm2-135m-instruct.gguf")
	if _, err := os.Stat(cached); err == nil {
		return cached
	}
	return "smollm2-135m-instruct" // a name the worker resolves itself
}

func repoRoot() string {
	if r := os.Getenv("ORCD_REPO"); r != "" {
		return r
	}
	// go test runs in the package directory: clients/go/src/orcd/client.
	wd, _ := os.Getwd()
	return filepath.Join(wd, "..", "..", "..", "..", "..")
}

func startWorker() (stop func(), err error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	python := os.Getenv("ORCD_PYTHON")
	if python == "" {
		python = "python3"
	}
	cmd := exec.Command(python, "-m", "orcd_grpc.cli", "serve", "--host", "127.0.0.1",
		"--port", fmt.Sprint(port), "--model", modelArg(), "--backend", "cpu")
	cmd.Dir = repoRoot()
	logTail := &tailBuffer{}
	cmd.Stderr = logTail
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop = func() {
		select {
		case <-exited:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}

	addr = fmt.Sprintf("127.0.0.1:%d", port)
	c, err := Dial(addr)
	if err != nil {
		stop()
		return nil, err
	}
	defer c.Close()
	timeout := 180 * time.Second
	if s := os.Getenv("ORCD_START_TIMEOUT_MS"); s != "" {
		var ms int
		fmt.Sscan(s, &ms)
		timeout = time.Duration(ms) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		// A worker that dies while starting should fail the wait now, not at the timeout.
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := c.WaitForServing(ctx, 250*time.Millisecond); err != nil {
		stop()
		return nil, fmt.Errorf("%v\n--- worker log tail ---\n%s", err, logTail.String())
	}
	return stop, nil
}

func TestMain(m *testing.M) {
	stop := func() {}
	if addr = os.Getenv("ORCD_ADDRESS"); addr == "" {
		var err error
		if stop, err = startWorker(); err != nil {
			fmt.Fprintln(os.Stderr, "starting the worker:", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	stop()
	os.Exit(code)
}

func dial(t *testing.T) *Client {
	t.Helper()
	c, err := Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func greedy() *orcdv1.SamplingParams {
	zero := float32(0)
	return &orcdv1.SamplingParams{Temperature: &zero}
}

// waitUntilGone polls Cancel until NOT_FOUND: the worker no longer runs the request.
func waitUntilGone(t *testing.T, c *Client, id string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.Cancel(ctx, id)
		cancel()
		if err != nil {
			if status.Code(err) != codes.NotFound {
				t.Fatalf("Cancel(%q): want NOT_FOUND, got %v", id, err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("request %q still known %v later", id, within)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestHealthServing(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Check(ctx)
	if err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v, %v; want SERVING", st, err)
	}
}

func TestExecuteStreamsGreedyCompletion(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const maxTokens = 8
	var kinds []string
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		Input:    &orcdv1.ExecuteRequest_Text{Text: "The capital of France is"},
		Sampling: greedy(),
		Stopping: &orcdv1.StoppingCriteria{MaxTokens: maxTokens},
	}, func(ev *orcdv1.ExecuteResponse) error {
		switch ev.GetEvent().(type) {
		case *orcdv1.ExecuteResponse_Started:
			kinds = append(kinds, "started")
		case *orcdv1.ExecuteResponse_Token:
			kinds = append(kinds, "token")
		case *orcdv1.ExecuteResponse_Finished:
			kinds = append(kinds, "finished")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "started," + strings.Repeat("token,", maxTokens) + "finished"
	if got := strings.Join(kinds, ","); got != want {
		t.Fatalf("event order %s, want %s", got, want)
	}
	if res.Started.GetRequestId() == "" || res.Started.GetPromptTokens() == 0 {
		t.Errorf("Started = %v: want a request id and prompt tokens", res.Started)
	}
	if r := res.Finished.GetReason(); r != orcdv1.FinishReason_FINISH_REASON_LENGTH {
		t.Errorf("reason %v, want LENGTH", r)
	}
	if n := res.Finished.GetUsage().GetCompletionTokens(); n != maxTokens {
		t.Errorf("completion_tokens %d, want %d", n, maxTokens)
	}
	for i, tok := range res.Tokens {
		if tok.GetIndex() != uint32(i) {
			t.Errorf("token %d has index %d", i, tok.GetIndex())
		}
	}
	if !strings.Contains(res.Text(), "Paris") {
		t.Errorf("greedy completion %q does not mention Paris", res.Text())
	}
}

func TestCancelAfterFirstToken(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	id := fmt.Sprintf("go-cancel-%d-%d", os.Getpid(), time.Now().UnixNano())
	var cancelled bool
	var cancelErr error
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		RequestId: id,
		Input:     &orcdv1.ExecuteRequest_Text{Text: "Write a long story about a dragon."},
		Sampling:  greedy(),
		Stopping:  &orcdv1.StoppingCriteria{MaxTokens: 200, IgnoreEos: true},
	}, func(ev *orcdv1.ExecuteResponse) error {
		if tok := ev.GetToken(); tok != nil && tok.GetIndex() == 0 {
			cancelled, cancelErr = c.Cancel(ctx, id)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if cancelErr != nil || !cancelled {
		t.Fatalf("Cancel: %v, %v; want true, nil", cancelled, cancelErr)
	}
	if r := res.Finished.GetReason(); r != orcdv1.FinishReason_FINISH_REASON_CANCELLED {
		t.Fatalf("reason %v, want CANCELLED", r)
	}
	if len(res.Tokens) >= 200 {
		t.Fatalf("generated all %d tokens despite Cancel", len(res.Tokens))
	}
	waitUntilGone(t, c, id, 5*time.Second)
}

func TestAbandonedStreamIsCancelled(t *testing.T) {
	c := dial(t)
	id := fmt.Sprintf("go-abandon-%d-%d", os.Getpid(), time.Now().UnixNano())
	stopReading := errors.New("stop")
	_, err := c.Execute(context.Background(), &orcdv1.ExecuteRequest{
		RequestId: id,
		Input:     &orcdv1.ExecuteRequest_Text{Text: "Count to one thousand:"},
		Sampling:  greedy(),
		Stopping:  &orcdv1.StoppingCriteria{MaxTokens: 200, IgnoreEos: true},
	}, func(ev *orcdv1.ExecuteResponse) error {
		if ev.GetToken() != nil {
			return stopReading
		}
		return nil
	})
	if err != stopReading {
		t.Fatalf("Execute returned %v, want the callback's error", err)
	}
	// The client cancelled the call; the worker must drop the request within a decode step.
	waitUntilGone(t, c, id, 30*time.Second)
}

func TestHardwareInfoCPU(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hw, err := c.HardwareInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if hw.GetBackend() != "cpu" {
		t.Errorf("backend %q, want cpu", hw.GetBackend())
	}
	if hw.GetCpu().GetCores() == 0 {
		t.Errorf("cpu.cores = 0")
	}
	if hw.GetRamTotalBytes() == 0 {
		t.Errorf("ram_total_bytes = 0")
	}
	if hw.GetBuild().GetVersion() == "" {
		t.Errorf("build.version empty")
	}
}

func TestTokenizeMatchesThePrompt(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const text = "The capital of France is Paris."
	tok, err := c.Tokenize(ctx, text, true)
	if err != nil {
		t.Fatal(err)
	}
	ids, offs := tok.GetIds(), tok.GetOffsets()
	if len(ids) < 5 || len(offs) != len(ids) {
		t.Fatalf("%d ids, %d offsets: want >= 5 ids and one offset each", len(ids), len(offs))
	}
	var last *orcdv1.TokenOffset
	for _, o := range offs {
		if o.GetEnd() > o.GetStart() {
			last = o
		}
	}
	if last == nil || last.GetEnd() != uint32(len(text)) {
		t.Errorf("offsets %v do not reach the end of the text (%d bytes)", offs, len(text))
	}
	// The ids are the prompt Execute runs.
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		Input:    &orcdv1.ExecuteRequest_Text{Text: text},
		Stopping: &orcdv1.StoppingCriteria{MaxTokens: 1},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Started.GetPromptTokens(); got != uint32(len(ids)) {
		t.Errorf("Execute's prompt has %d tokens, Tokenize gave %d", got, len(ids))
	}
	if _, err := c.Tokenize(ctx, "", false); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Tokenize(\"\"): want INVALID_ARGUMENT, got %v", err)
	}
}

func TestScoreGivesOneLogprobPerPositionAfterTheFirst(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const text = "The quick brown fox jumps over the lazy dog."
	tok, err := c.Tokenize(ctx, text, false)
	if err != nil {
		t.Fatal(err)
	}
	ids := tok.GetIds()
	entries, err := c.Score(ctx, text, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(ids)-1 {
		t.Fatalf("%d entries for a %d-token prompt, want %d", len(entries), len(ids), len(ids)-1)
	}
	for i, e := range entries {
		lp := float64(e.GetLogprob())
		if e.GetTokenId() != ids[i+1] {
			t.Errorf("entry %d scores token %d, want prompt token %d", i, e.GetTokenId(), ids[i+1])
		}
		if math.IsNaN(lp) || math.IsInf(lp, 0) || lp >= 0 {
			t.Errorf("entry %d: logprob %v, want finite and negative", i, lp)
		}
		if top := e.GetTopLogprobs(); len(top) != 2 || float64(top[0].GetLogprob()) < lp-1e-4 {
			t.Errorf("entry %d: top alternatives %v (want 2, the first at least as likely as %v)", i, top, lp)
		}
	}
}

func TestRegexConstraintOutputFullmatches(t *testing.T) {
	c := dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	one := float32(1)
	seed := uint64(5)
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		Input:      &orcdv1.ExecuteRequest_Text{Text: "Pick a number:"},
		Sampling:   &orcdv1.SamplingParams{Temperature: &one, Seed: &seed},
		Stopping:   &orcdv1.StoppingCriteria{MaxTokens: 16},
		Constraint: &orcdv1.Constraint{Kind: &orcdv1.Constraint_Regex{Regex: "[0-9]{3}"}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9]{3}$`).MatchString(res.Text()) {
		t.Errorf("constrained output %q does not fullmatch [0-9]{3}", res.Text())
	}
	if r := res.Finished.GetReason(); r == orcdv1.FinishReason_FINISH_REASON_LENGTH {
		t.Errorf("reason %v: the grammar should end the output", r)
	}
}

// With CoalesceTokens, tokens the reader fell behind on arrive as TokenBatch events, and
// Execute's result lists every token once, in order. A 64 KiB receive window (grpc-go's
// smallest; setting it also turns off its growth) fills while the callback sleeps after
// Started, so the worker's sends block and the rest of the tokens wait in its queue.
func TestCoalescedTokensArriveInBatchesAndFlatten(t *testing.T) {
	c, err := Dial(addr, grpc.WithInsecure(), grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// A Token with 20 top logprobs is ~285 bytes on the wire for this prompt: the 64 KiB window
	// (grpc-go's floor) holds ~230 of them, so the worker must decode well past that while the
	// reader sleeps. 20 s at >= 12 tok/s does; the worker does 25-45 on a 2-core CI host.
	const maxTokens = 1000
	batches := 0
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		Input:          &orcdv1.ExecuteRequest_Text{Text: "Count from one to a thousand:"},
		Sampling:       greedy(),
		Stopping:       &orcdv1.StoppingCriteria{MaxTokens: maxTokens, IgnoreEos: true},
		TopLogprobs:    20,
		CoalesceTokens: true,
	}, func(ev *orcdv1.ExecuteResponse) error {
		switch e := ev.GetEvent().(type) {
		case *orcdv1.ExecuteResponse_Started:
			time.Sleep(20 * time.Second)
		case *orcdv1.ExecuteResponse_TokenBatch:
			if len(e.TokenBatch.GetTokens()) < 2 {
				t.Errorf("a TokenBatch of %d tokens (a lone token is a Token event)", len(e.TokenBatch.GetTokens()))
			}
			batches++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if batches == 0 {
		t.Errorf("no TokenBatch event although the reader slept")
	}
	if n := res.Finished.GetUsage().GetCompletionTokens(); n != maxTokens || len(res.Tokens) != maxTokens {
		t.Fatalf("%d tokens listed, completion_tokens %d, want %d", len(res.Tokens), n, maxTokens)
	}
	for i, tok := range res.Tokens {
		if tok.GetIndex() != uint32(i) {
			t.Fatalf("token %d has index %d", i, tok.GetIndex())
		}
	}
}
