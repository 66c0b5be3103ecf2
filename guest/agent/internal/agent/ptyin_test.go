package agent

import (
	"bytes"
	"crypto/md5"
	"fmt"
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
		for seen := []byte{}; !bytes.Contains(seen, []byte("ready")); {
			if f := c.next(i, 10*time.Second); f.Kind == KindOut {
				seen = append(seen, f.Payload...)
			}
		}
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
