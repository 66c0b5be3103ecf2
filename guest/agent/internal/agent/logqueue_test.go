package agent

import (
	"strings"
	"sync"
	"testing"
	"time"
)

// stalledConsole is /dev/console whose output guest root stopped (tcflow
// TCOOFF) or a flood holds: a write waits until released.
type stalledConsole struct {
	release chan struct{}
	mu      sync.Mutex
	got     strings.Builder
}

func (c *stalledConsole) Write(p []byte) (int, error) {
	<-c.release
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got.Write(p)
}

func (c *stalledConsole) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got.String()
}

// One refused guest connect (a process dialling vsock loopback) logs a line;
// with the console stalled that line used to stop the accept loop, and the
// host could no longer connect.
func TestAStalledConsoleDoesNotStopTheVsockAcceptLoop(t *testing.T) {
	srv := NewServer(time.Now())
	con := &stalledConsole{release: make(chan struct{})}
	defer close(con.release)
	srv.Log = con
	key, _ := parseVsockKey(testKey)
	srv.vsockKey.set(key)
	verdicts := make(chan bool, 2)
	verdicts <- false // a guest process over loopback
	verdicts <- true  // then the host
	dial, _, _ := acceptingUnix(t, srv, verdicts, defaultVsockLimits)
	dial()
	time.Sleep(100 * time.Millisecond)
	host := dial()
	resp, err := rawHello(t, host, "n1", "key", testKey)
	if err != nil || resp["ok"] != true {
		t.Fatalf("the host's vsock hello after one refused guest connect: %v %v", resp, err)
	}
}

// Lines past the queue are dropped, and the console is told how many.
func TestConsoleLinesPastTheQueueAreDroppedAndCounted(t *testing.T) {
	srv := NewServer(time.Now())
	con := &stalledConsole{release: make(chan struct{})}
	srv.Log = con
	done := make(chan struct{})
	go func() {
		for i := 0; i < logQueueLines+100; i++ {
			srv.logf("line %d", i)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("logf waited for a stalled console")
	}
	close(con.release)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(con.text(), "lines dropped") && time.Now().Before(deadline) {
		srv.logf("after")
		time.Sleep(10 * time.Millisecond)
	}
	text := con.text()
	if !strings.Contains(text, "isorun-agent: line 0\n") || !strings.Contains(text, "lines dropped: the console did not take them") {
		t.Fatalf("console got %q", text[:min(len(text), 400)])
	}
}
