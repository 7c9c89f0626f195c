// Package client is a small convenience layer over the generated orcd.v1.Worker stubs
// (package orcd/gen/orcdv1, made by clients/go/generate.sh). The raw stubs stay reachable as
// Client.Worker and Client.Health for anything the helpers here do not cover.
package client

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	orcdv1 "orcd/gen/orcdv1"
)

// Client holds one connection to a worker.
type Client struct {
	conn   *grpc.ClientConn
	Worker orcdv1.WorkerClient
	Health healthpb.HealthClient
}

// Dial connects to a worker at "host:port". Without options the connection is plaintext (the
// worker's default); pass grpc.WithTransportCredentials(...) for TLS. The dial itself does not
// block: the first call waits for the connection.
func Dial(address string, opts ...grpc.DialOption) (*Client, error) {
	if len(opts) == 0 {
		// grpc-go 1.33 (Debian 12) predates credentials/insecure; WithInsecure is its spelling.
		opts = []grpc.DialOption{grpc.WithInsecure()}
	}
	conn, err := grpc.Dial(address, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, Worker: orcdv1.NewWorkerClient(conn), Health: healthpb.NewHealthClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// WithToken returns a context that sends "authorization: Bearer <token>", for workers with auth on.
func WithToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// Result is a whole Execute stream, gathered. With n > 1 parallel samples, Tokens holds every
// sample's tokens (Token.SampleIndex says whose), Finished the last sample's Finished and
// AllFinished one per sample in arrival order.
type Result struct {
	Started  *orcdv1.Started
	Tokens   []*orcdv1.Token
	Finished *orcdv1.Finished
	// With ExecuteRequest.PromptLogprobs: one entry per prompt position from 1 on, in order.
	PromptLogprobs []*orcdv1.PromptTokenLogprob
	AllFinished    []*orcdv1.Finished
}

// Text is the generated text: the tokens' texts joined.
func (r *Result) Text() string {
	var b strings.Builder
	for _, t := range r.Tokens {
		b.WriteString(t.GetText())
	}
	return b.String()
}

// Execute runs one request to its end. onEvent, when not nil, sees every event as it arrives;
// returning an error from it stops reading, cancels the call (so the worker stops generating)
// and is returned. Cancelling ctx does the same.
func (c *Client) Execute(ctx context.Context, req *orcdv1.ExecuteRequest, onEvent func(*orcdv1.ExecuteResponse) error) (*Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	// Cancelling the call context on every return path ends the stream on the worker too.
	defer cancel()
	stream, err := c.Worker.Execute(ctx, req)
	if err != nil {
		return nil, err
	}
	res := &Result{}
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			if res.Finished == nil {
				return res, fmt.Errorf("orcd: Execute stream ended without a Finished event")
			}
			return res, nil
		}
		if err != nil {
			return res, err
		}
		switch e := ev.GetEvent().(type) {
		case *orcdv1.ExecuteResponse_Started:
			res.Started = e.Started
		case *orcdv1.ExecuteResponse_Token:
			res.Tokens = append(res.Tokens, e.Token)
		case *orcdv1.ExecuteResponse_TokenBatch: // coalesce_tokens: several tokens in one message
			res.Tokens = append(res.Tokens, e.TokenBatch.Tokens...)
		case *orcdv1.ExecuteResponse_PromptLogprobs:
			res.PromptLogprobs = append(res.PromptLogprobs, e.PromptLogprobs.GetEntries()...)
		case *orcdv1.ExecuteResponse_Finished:
			res.Finished = e.Finished
			res.AllFinished = append(res.AllFinished, e.Finished)
		}
		if onEvent != nil {
			if err := onEvent(ev); err != nil {
				return res, err
			}
		}
	}
}

// Cancel cancels a running or queued request. It reports whether the worker was still running
// it; an unknown or finished request is a NOT_FOUND error.
func (c *Client) Cancel(ctx context.Context, requestID string) (bool, error) {
	res, err := c.Worker.Cancel(ctx, &orcdv1.CancelRequest{RequestId: requestID})
	if err != nil {
		return false, err
	}
	return res.GetCancelled(), nil
}

// Tokenize returns the model's token ids for a text (with offsets: each token's byte span), as
// Execute would run that input.
func (c *Client) Tokenize(ctx context.Context, text string, offsets bool) (*orcdv1.TokenizeResponse, error) {
	return c.Worker.Tokenize(ctx, &orcdv1.TokenizeRequest{
		Input:         &orcdv1.TokenizeRequest_Text{Text: text},
		ReturnOffsets: offsets,
	})
}

// Score returns the teacher-forced log-probs of a text's tokens, generating nothing (Execute
// with prompt_logprobs and max_tokens 0): one entry per prompt position from 1 on, each with
// the topN most likely alternatives.
func (c *Client) Score(ctx context.Context, text string, topN uint32) ([]*orcdv1.PromptTokenLogprob, error) {
	res, err := c.Execute(ctx, &orcdv1.ExecuteRequest{
		Input:          &orcdv1.ExecuteRequest_Text{Text: text},
		PromptLogprobs: &orcdv1.PromptLogprobsOptions{Enabled: true, TopN: topN},
		// 0 with prompt log-probs on: score the prompt, generate nothing.
		Stopping: &orcdv1.StoppingCriteria{MaxTokens: 0},
	}, nil)
	if err != nil {
		return nil, err
	}
	return res.PromptLogprobs, nil
}

// HardwareInfo describes the worker's machine, accelerator and build.
func (c *Client) HardwareInfo(ctx context.Context) (*orcdv1.HardwareInfoResponse, error) {
	return c.Worker.HardwareInfo(ctx, &orcdv1.HardwareInfoRequest{})
}

// ListModels lists the loaded models.
func (c *Client) ListModels(ctx context.Context) ([]*orcdv1.ModelDescription, error) {
	res, err := c.Worker.ListModels(ctx, &orcdv1.ListModelsRequest{})
	if err != nil {
		return nil, err
	}
	return res.GetModels(), nil
}

// Check asks the standard gRPC health service about the worker as a whole (service ""),
// which is SERVING once a model is loaded.
func (c *Client) Check(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	res, err := c.Health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return res.GetStatus(), nil
}

// WaitForServing polls Check until SERVING or ctx ends. Errors count as "not yet": a worker
// that is still starting refuses connections.
func (c *Client) WaitForServing(ctx context.Context, every time.Duration) error {
	last := "no answer"
	for {
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := c.Check(callCtx)
		cancel()
		if err == nil && st == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = st.String()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("orcd: worker not SERVING (last: %s): %w", last, ctx.Err())
		case <-time.After(every):
		}
	}
}
