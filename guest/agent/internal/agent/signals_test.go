package agent

import (
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// As PID 1 the agent must survive signals a guest process sends it (kill -HUP 1
// ...): the Go runtime's default would exit, and init exiting panics the kernel.
// Without the handlers this test's own process dies.
func TestStraySignalsAreLoggedNotFatal(t *testing.T) {
	var mu sync.Mutex
	var log strings.Builder
	stop := ignoreStraySignals(func(f string, a ...any) {
		mu.Lock()
		fmt.Fprintf(&log, f+"\n", a...)
		mu.Unlock()
	})
	defer stop()
	sigs := []syscall.Signal{syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1,
		syscall.SIGPWR, syscall.SIGQUIT, syscall.SIGSEGV}
	for _, sig := range append(sigs, syscall.SIGPIPE) { // SIGPIPE: survived, not logged
		if err := syscall.Kill(syscall.Getpid(), sig); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := strings.Count(log.String(), "ignored signal")
		mu.Unlock()
		if n == len(sigs) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d signals logged:\n%s", n, len(sigs), log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // a SIGPIPE line would be in by now
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(log.String(), "ignored signal"); n != len(sigs) {
		t.Fatalf("%d signals logged, want %d:\n%s", n, len(sigs), log.String())
	}
}
