package agent

import (
	"bufio"
	"encoding/json"
	"io"
	"strings"
	"sync"
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

// A REQ past the bound is answered busy even while the writer's queue is
// full, as it is whenever several requests stream output faster than the
// link carries it: the connection is not dropped as a protocol violation.
func TestBusyIsAnsweredWhileTheWriterIsBacklogged(t *testing.T) {
	saved := MaxOpenChannels
	MaxOpenChannels = 8
	t.Cleanup(func() { MaxOpenChannels = saved })
	a, b := socketpair(t)
	t.Cleanup(func() { a.Close() })
	done := make(chan error, 1)
	go func() { done <- NewServer(time.Now()).ServeConn(b); b.Close() }()
	var wmu sync.Mutex
	send := func(ch uint32, kind uint8, p []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		a.Write(EncodeFrame(ch, kind, p))
	}
	exec, _ := json.Marshal(map[string]any{"op": "exec", "cmd": "head -c 50000000 /dev/zero"})
	health, _ := json.Marshal(map[string]any{"op": "health"})
	for id := uint32(1); id <= 8; id++ {
		send(id, KindReq, exec)
	}
	time.Sleep(time.Second) // the host reads nothing yet: the writer's queue fills
	send(9, KindReq, health)
	time.Sleep(200 * time.Millisecond)
	fr := NewFrameReader(a)
	resps := map[uint32]string{}
	for resps[10] == "" {
		a.SetReadDeadline(time.Now().Add(20 * time.Second))
		f, err := fr.Read()
		if err != nil {
			select {
			case e := <-done:
				t.Fatalf("read: %v; ServeConn returned: %v", err, e)
			default:
				t.Fatalf("read: %v; answers so far %v", err, resps)
			}
		}
		if f.Kind == KindOut {
			send(f.Chan, KindCredit, be32(uint32(len(f.Payload))))
		}
		if f.Kind != KindResp {
			continue
		}
		resps[f.Chan] = string(f.Payload)
		switch {
		case f.Chan == 9 && !strings.Contains(resps[9], `"busy"`):
			t.Fatalf("request past the bound answered %s", resps[9])
		case f.Chan == 9:
			for id := uint32(1); id <= 8; id++ {
				send(id, KindCancel, nil)
			}
		case len(resps) == 9: // the streams ended: slots are free again
			send(10, KindReq, health)
		}
	}
	if !strings.Contains(resps[10], `"ok":true`) {
		t.Fatalf("health after the busy answer: %s", resps[10])
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
		if err := s.serveConn(noHost, br, nil, nil); err != io.EOF {
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
