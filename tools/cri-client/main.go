// Command cri-client makes one call of the Kubernetes CRI (runtime.v1) to a
// runtime's gRPC socket, the way kubelet would, for the tests: the request
// message as JSON on stdin (the generated Go structs' field names, e.g.
// {"config":{"metadata":{"name":"web"},"port_mappings":[...]}}), the
// response as JSON on stdout. An error is printed on stderr, exit status 1.
//
//	cri-client SOCKET METHOD < request.json
//
// ExecSync answers {"stdout":"…","stderr":"…","exit_code":N} with the
// output as text rather than base64, so a test can read it directly.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// timeout bounds a whole call; RunPodSandbox runs the CNI ADD.
const timeout = 2 * time.Minute

type handler func(ctx context.Context, in []byte) (interface{}, error)

// call turns a generated client method into a handler that decodes its
// request from JSON.
func call[Req any, Resp any](f func(context.Context, *Req, ...grpc.CallOption) (*Resp, error)) handler {
	return func(ctx context.Context, in []byte) (interface{}, error) {
		req := new(Req)
		if err := decode(in, req); err != nil {
			return nil, err
		}
		return f(ctx, req)
	}
}

// decode reads a JSON request; empty input is the empty request. Unknown
// fields are errors, so a misspelt key in a test cannot pass unnoticed.
func decode(in []byte, v interface{}) error {
	if len(bytes.TrimSpace(in)) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(in))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	return nil
}

type execResult struct {
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
	ExitCode int32  `json:"exit_code"`
}

func handlers(rt runtime.RuntimeServiceClient, im runtime.ImageServiceClient) map[string]handler {
	return map[string]handler{
		"Version":          call(rt.Version),
		"RunPodSandbox":    call(rt.RunPodSandbox),
		"StopPodSandbox":   call(rt.StopPodSandbox),
		"RemovePodSandbox": call(rt.RemovePodSandbox),
		"PodSandboxStatus": call(rt.PodSandboxStatus),
		"ListPodSandbox":   call(rt.ListPodSandbox),
		"CreateContainer":  call(rt.CreateContainer),
		"StartContainer":   call(rt.StartContainer),
		"StopContainer":    call(rt.StopContainer),
		"RemoveContainer":  call(rt.RemoveContainer),
		"ContainerStatus":  call(rt.ContainerStatus),
		"ListContainers":   call(rt.ListContainers),
		"ListImages":       call(im.ListImages),
		"ImageStatus":      call(im.ImageStatus),
		"ExecSync": func(ctx context.Context, in []byte) (interface{}, error) {
			req := new(runtime.ExecSyncRequest)
			if err := decode(in, req); err != nil {
				return nil, err
			}
			resp, err := rt.ExecSync(ctx, req)
			if err != nil {
				return nil, err
			}
			return execResult{string(resp.Stdout), string(resp.Stderr), resp.ExitCode}, nil
		},
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "cri-client: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: cri-client SOCKET METHOD < request.json (METHOD: a CRI call, e.g. RunPodSandbox)")
	}
	socket, method := os.Args[1], os.Args[2]
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// A plain unix socket path, dialled directly: the grpc of this era
	// has no unix:// resolver.
	conn, err := grpc.DialContext(ctx, socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		fail("connecting to %s: %v", socket, err)
	}
	defer conn.Close()

	h, ok := handlers(runtime.NewRuntimeServiceClient(conn), runtime.NewImageServiceClient(conn))[method]
	if !ok {
		fail("unknown method %q", method)
	}
	resp, err := h(ctx, in)
	if err != nil {
		fail("%s: %v", method, err)
	}
	out, err := json.Marshal(resp)
	if err != nil {
		fail("encoding the response: %v", err)
	}
	fmt.Println(string(out))
}
