package agent

import (
	"encoding/binary"
	"encoding/json"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// client is a minimal host side for tests: it reads frames into per-channel
// queues and credits OUT/ERR as it receives them (unless told not to).
type client struct {
	t        *testing.T
	conn     net.Conn
	mu       sync.Mutex
	chans    map[uint32]chan Frame
	credit   bool
	done     chan error
	srv      *Server
	finished bool
}

func socketpair(t *testing.T) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "sp")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return mk(fds[0]), mk(fds[1])
}

func newClient(t *testing.T, srv *Server) *client {
	t.Helper()
	if srv == nil {
		srv = NewServer(time.Now())
	}
	a, b := socketpair(t)
	c := dialedClient(t, srv, a)
	go func() { c.done <- srv.ServeConn(b); b.Close() }()
	return c
}

// dialedClient is a client on a connection some server already serves.
func dialedClient(t *testing.T, srv *Server, a net.Conn) *client {
	t.Helper()
	c := &client{t: t, conn: a, chans: map[uint32]chan Frame{}, credit: true,
		done: make(chan error, 1), srv: srv}
	go c.readLoop()
	t.Cleanup(func() {
		c.mu.Lock()
		c.finished = true // the reader must not log once the test is over
		c.mu.Unlock()
		a.Close()
	})
	return c
}

func (c *client) q(ch uint32) chan Frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	q := c.chans[ch]
	if q == nil {
		q = make(chan Frame, 100000)
		c.chans[ch] = q
	}
	return q
}

func (c *client) readLoop() {
	fr := NewFrameReader(c.conn)
	for {
		f, err := fr.Read()
		if err != nil {
			c.mu.Lock()
			if !c.finished {
				c.t.Logf("client read: %v", err)
			}
			c.mu.Unlock()
			return
		}
		if c.credit && (f.Kind == KindOut || f.Kind == KindErr) {
			c.send(f.Chan, KindCredit, be32(uint32(len(f.Payload))))
		}
		c.q(f.Chan) <- f
	}
}

func be32(n uint32) []byte {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	return b[:]
}

func (c *client) send(ch uint32, kind uint8, payload []byte) {
	if _, err := c.conn.Write(EncodeFrame(ch, kind, payload)); err != nil {
		c.t.Logf("send: %v", err)
	}
}

func (c *client) req(ch uint32, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	c.send(ch, KindReq, b)
}

func (c *client) next(ch uint32, d time.Duration) Frame {
	c.t.Helper()
	select {
	case f := <-c.q(ch):
		return f
	case <-time.After(d):
		c.t.Fatalf("timeout waiting for a frame on channel %d", ch)
	}
	return Frame{}
}

// result is everything one channel produced up to its RESP.
type result struct {
	resp   map[string]any
	out    []byte
	err    []byte
	events []map[string]any
	order  []uint8
}

func (c *client) wait(ch uint32, d time.Duration) *result {
	c.t.Helper()
	r := &result{}
	deadline := time.Now().Add(d)
	for {
		f := c.next(ch, time.Until(deadline))
		r.order = append(r.order, f.Kind)
		switch f.Kind {
		case KindOut:
			r.out = append(r.out, f.Payload...)
		case KindErr:
			r.err = append(r.err, f.Payload...)
		case KindEvent:
			var m map[string]any
			if err := json.Unmarshal(f.Payload, &m); err != nil {
				c.t.Fatal(err)
			}
			r.events = append(r.events, m)
		case KindResp:
			if err := json.Unmarshal(f.Payload, &r.resp); err != nil {
				c.t.Fatal(err)
			}
			return r
		}
	}
}

func (c *client) call(ch uint32, v any) *result {
	c.t.Helper()
	c.req(ch, v)
	return c.wait(ch, 20*time.Second)
}

func num(v any) int64 {
	f, _ := v.(float64)
	return int64(f)
}

// waitUntil polls cond until it holds, failing the test after d: for a state a
// test sets up in another process (a trap set, a job in the foreground), which
// a fixed sleep only guesses at on a busy machine.
func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fileExists reports whether path exists (a marker a test's command touches).
func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
