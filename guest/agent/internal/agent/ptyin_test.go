package agent

import (
	"bytes"
	"crypto/md5"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Input sent to terminals whose programs do not read it yet waits without an OS thread
// per terminal (a thread the Go runtime cannot make ends the agent, PID 1), and arrives
// whole, in order, once each program reads.
func TestInputWaitingForATerminalHoldsNoThread(t *testing.T) {
	const n = 20
	c := newClient(t, nil)
	before := threadsOfThisProcess(t)
	input := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB: past what a tty holds
	for i := uint32(1); i <= n; i++ {
		// raw: the line discipline hands 64 KiB without a newline over as it came (a
		// cooked one drops what passes 4 KiB), so the input goes once raw is set
		c.req(i, map[string]any{"op": "exec", "pty": map[string]any{}, "stdin": true,
			"cmd": "stty raw -echo; echo ready; sleep 2; head -c 65536 | md5sum"})
		waitForOutput(c, i, "ready")
		for off := 0; off < len(input); off += 16 << 10 {
			c.send(i, KindIn, input[off:off+16<<10])
		}
	}
	time.Sleep(time.Second) // the programs sleep: the writes wait for room
	if grew := threadsOfThisProcess(t) - before; grew > n/4 {
		t.Errorf("%d terminals with input waiting added %d threads", n, grew)
	}
	want := fmt.Sprintf("%x", md5.Sum(input))
	for i := uint32(1); i <= n; i++ {
		r := c.wait(i, 30*time.Second)
		if !bytes.Contains(r.out, []byte(want)) || num(r.resp["exit_code"]) != 0 {
			t.Fatalf("exec %d: out=%q resp=%v, want md5 %s", i, r.out, r.resp, want)
		}
	}
}

// A program that lets go of its terminal and runs on (a daemon, `exec >/dev/null`) with
// input for it still waiting: the input is dropped, not retried flat out (the kernel
// reports the hang-up for good, and a write still fills what the tty holds first).
func TestInputToATerminalNoOneHasOpenIsDropped(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "pty": map[string]any{}, "stdin": true,
		"cmd": "stty raw -echo; echo ready; exec </dev/null >/dev/null 2>&1; sleep 3"})
	waitForOutput(c, 1, "ready")
	time.Sleep(300 * time.Millisecond) // the shell has closed the terminal
	for i := 0; i < 4; i++ {
		c.send(1, KindIn, bytes.Repeat([]byte("x"), 16<<10))
	}
	time.Sleep(300 * time.Millisecond)
	cpu0 := cpuSelf()
	time.Sleep(time.Second)
	if used := cpuSelf() - cpu0; used > 300*time.Millisecond {
		t.Errorf("the agent used %v of CPU in 1 s holding input no one can read", used)
	}
	if r := c.wait(1, 20*time.Second); num(r.resp["exit_code"]) != 0 {
		t.Fatalf("resp=%v", r.resp)
	}
}

// A close of stdin (from another request) while input is part-way into a terminal with
// no room: its ^D goes after every byte sent before it, not inside them.
func TestAnEndOfInputFollowsTheInputSentBeforeIt(t *testing.T) {
	out := filepath.Join(t.TempDir(), "in.bin")
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "pty": map[string]any{}, "stdin": true,
		"cmd": "stty raw -echo; echo ready; sleep 1; head -c 65537 > " + out})
	waitForOutput(c, 1, "ready")
	for i := 0; i < 4; i++ {
		c.send(1, KindIn, bytes.Repeat([]byte("x"), 16<<10))
	}
	time.Sleep(200 * time.Millisecond) // the first piece is part-written, waiting for room
	c.req(2, map[string]any{"op": "close_stdin", "proc_id": "p1"})
	c.wait(1, 20*time.Second)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if i := bytes.IndexByte(b, 4); i%(16<<10) != 0 {
		t.Errorf("^D at byte %d of what the program read: inside a piece of input sent before it", i)
	}
}

// waitForOutput reads channel ch's frames until its output holds want.
func waitForOutput(c *client, ch uint32, want string) {
	c.t.Helper()
	for seen := []byte{}; !bytes.Contains(seen, []byte(want)); {
		if f := c.next(ch, 10*time.Second); f.Kind == KindOut {
			seen = append(seen, f.Payload...)
		}
	}
}
