package agent

import (
	"bufio"
	"io"
	"strings"
	"testing"
	"time"
)

// Requests open at once are bounded per connection: past the bound a REQ is
// refused as busy (nothing started for it), and a slot freed is usable again.
func TestOpenRequestsAreBounded(t *testing.T) {
	saved := MaxOpenChannels
	MaxOpenChannels = 3
	t.Cleanup(func() { MaxOpenChannels = saved })
	c := newClient(t, nil)
	for id := uint32(1); id <= 3; id++ {
		c.req(id, map[string]any{"op": "exec", "cmd": "sleep 30"})
		if f := c.next(id, 5*time.Second); f.Kind != KindEvent { // started
			t.Fatalf("request %d: frame kind %d", id, f.Kind)
		}
	}
	r := c.call(4, map[string]any{"op": "exec", "cmd": "echo never"})
	if r.resp["code"] != "busy" || !strings.Contains(r.resp["error"].(string), "3 requests") {
		t.Fatalf("resp %v", r.resp)
	}
	if len(r.out) != 0 {
		t.Fatalf("the refused command ran: %q", r.out)
	}
	c.send(1, KindCancel, nil)
	c.wait(1, 10*time.Second)
	if r := c.call(5, map[string]any{"op": "exec", "cmd": "echo now"}); string(r.out) != "now\n" {
		t.Fatalf("after a slot freed: out %q resp %v", r.out, r.resp)
	}
}

// An empty IN frame says nothing: it is not queued (it would cost the window
// nothing, so a host sending them without end would grow the queue so).
func TestEmptyInFramesAreNotQueued(t *testing.T) {
	ch := newChannel(&Conn{}, 1)
	for i := 0; i < 1000; i++ {
		if err := ch.pushIn(nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.pushIn([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if len(ch.inQ) != 1 {
		t.Fatalf("%d items queued, want the one with bytes", len(ch.inQ))
	}
}

// With no host on the serial port every read is an EOF, tried every few ms:
// such a try sets nothing up (no connection, goroutine or buffer per try).
func TestAnEmptyTryOfThePortAllocatesNothing(t *testing.T) {
	s := NewServer(time.Now())
	noHost := eofReader{}
	br := bufio.NewReaderSize(noHost, 2*MaxPayload)
	allocs := testing.AllocsPerRun(200, func() {
		if err := s.serveConn(noHost, br); err != io.EOF {
			t.Fatalf("err %v", err)
		}
		br.Reset(noHost)
	})
	if allocs > 0 {
		t.Fatalf("%.1f allocations per empty try", allocs)
	}
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error)    { return 0, io.EOF }
func (eofReader) Write(p []byte) (int, error) { return len(p), nil }
