package agent

import (
	"bytes"
	"testing"
	"time"
)

// alives counts the keepalive EVENTs (exact bytes) on channel ch up to its RESP.
func alives(t *testing.T, c *client, ch uint32) (n int, resp Frame) {
	t.Helper()
	for {
		f := c.next(ch, 20*time.Second)
		switch {
		case f.Kind == KindResp:
			return n, f
		case f.Kind == KindEvent && bytes.Equal(f.Payload, keepalivePayload):
			n++
		}
	}
}

func TestKeepaliveReachesEveryRunningRequest(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(9, map[string]any{"op": "keepalive", "interval_ms": 100})
	if got := num(r.resp["interval_ms"]); got != 100 {
		t.Fatalf("keepalive answered interval_ms %d, want 100", got)
	}
	// the first interval holds on the connection
	r = c.call(10, map[string]any{"op": "keepalive", "interval_ms": 5000})
	if got := num(r.resp["interval_ms"]); got != 100 {
		t.Fatalf("a second keepalive answered interval_ms %d, want the first's 100", got)
	}
	asked := time.Now()
	c.req(1, map[string]any{"op": "exec", "cmd": "sleep 1"})
	c.watch(2, map[string]any{"path": t.TempDir()})
	n, resp := alives(t, c, 1)
	lasted := time.Since(asked) // a busy host makes `sleep 1` take longer
	if resp.Kind != KindResp || n < 5 || n > int(lasted/(100*time.Millisecond))+3 {
		t.Fatalf("a request open %v got %d keepalives at 100 ms", lasted, n)
	}
	// the watch, which reports nothing, goes on getting them
	for i := 0; i < 3; i++ {
		if f := c.next(2, 5*time.Second); !bytes.Equal(f.Payload, keepalivePayload) {
			t.Fatalf("watch got %d %q, want a keepalive", f.Kind, f.Payload)
		}
	}
	// an answered request gets none: nothing follows its RESP
	select {
	case f := <-c.q(1):
		t.Fatalf("frame %d %q after the RESP", f.Kind, f.Payload)
	case <-time.After(300 * time.Millisecond):
	}
}

func TestKeepaliveOffUnlessAskedAndClamped(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "cmd": "sleep 0.5"})
	if n, _ := alives(t, c, 1); n != 0 {
		t.Fatalf("%d keepalives nobody asked for", n)
	}

	for _, tc := range []struct{ ask, want int64 }{{1, 100}, {1 << 40, 60000}, {-5, 0}, {0, 0}} {
		c := newClient(t, nil)
		r := c.call(1, map[string]any{"op": "keepalive", "interval_ms": tc.ask})
		if got := num(r.resp["interval_ms"]); got != tc.want || r.resp["ok"] != true {
			t.Fatalf("interval_ms %d answered %v, want %d", tc.ask, r.resp, tc.want)
		}
	}
	c = newClient(t, nil)
	r := c.call(1, map[string]any{"op": "keepalive", "interval_ms": "5"})
	if r.resp["ok"] != false || r.resp["code"] != "invalid" {
		t.Fatalf("a string interval answered %v", r.resp)
	}
}
