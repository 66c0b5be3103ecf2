package agent

import (
	"bytes"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A program writing short lines to its terminal, one write each, reaches the host in
// pieces of many lines, not one frame per write (each frame, and each wakeup of the
// agent, is dear under TCG). Its first line still arrives at once.
func TestAPTYProgramsShortWritesArriveInFewFrames(t *testing.T) {
	const lines = 3000
	c := newClient(t, nil)
	// the shell's echo is a builtin: one write(2) per line, as a line-buffered program does
	r := c.call(1, map[string]any{"op": "exec", "pty": map[string]any{"rows": 24, "cols": 80},
		"cmd": fmt.Sprintf("i=0; while [ $i -lt %d ]; do echo 123456789; i=$((i+1)); done", lines)})
	frames := 0
	for _, k := range r.order {
		if k == KindOut {
			frames++
		}
	}
	if want := bytes.Repeat([]byte("123456789\r\n"), lines); !bytes.Equal(r.out, want) {
		t.Fatalf("output differs: %d bytes, want %d", len(r.out), len(want))
	}
	if frames > lines/25 { // one per write before; a handful now
		t.Fatalf("%d lines came in %d OUT frames", lines, frames)
	}
	t.Logf("%d lines in %d OUT frames", lines, frames)
}

// Output written after a quiet spell is sent at once: the pause that gathers a
// terminal's small writes follows a read, it never precedes the first.
func TestAPTYsFirstOutputIsNotHeldBack(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "pty": map[string]any{}, "stdin": true,
		"cmd": "while read -r line; do echo \"got $line\"; done"})
	var took []time.Duration
	for i := 0; i < 5; i++ {
		time.Sleep(50 * time.Millisecond) // quiet: the pump waits in poll, not in a pause
		sent := time.Now()
		c.send(1, KindIn, []byte(fmt.Sprintf("x%d\n", i)))
		want := []byte(fmt.Sprintf("got x%d", i))
		var seen []byte
		for !bytes.Contains(seen, want) {
			f := c.next(1, 5*time.Second)
			if f.Kind != KindOut {
				continue
			}
			seen = append(seen, f.Payload...)
		}
		took = append(took, time.Since(sent))
	}
	c.send(1, KindEOF, nil)
	// the median: one answer a busy host held up is no pause of the agent's
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	if took[len(took)/2] > coalescePause+200*time.Millisecond {
		t.Errorf("answers took %v", took)
	}
}

func threadsOfThisProcess(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads: in /proc/self/status")
	return 0
}

// A PTY's pump waits in the runtime poller, not in an OS thread of its own: terminals
// held open by jobs left behind (none of them a live process any more) would otherwise
// add up to threads, and the Go runtime ends the agent (PID 1) when it cannot make one.
func TestTerminalsWaitingForOutputHoldNoThreads(t *testing.T) {
	const n = 40
	c := newClient(t, nil)
	before := threadsOfThisProcess(t)
	for i := 0; i < n; i++ {
		r := c.call(uint32(i+1), map[string]any{"op": "exec", "pty": map[string]any{},
			"cmd": "trap '' HUP; sleep 3 & echo hi"})
		if num(r.resp["exit_code"]) != 0 || !bytes.Contains(r.out, []byte("hi")) {
			t.Fatalf("resp=%v out=%q", r.resp, r.out)
		}
	}
	if grew := threadsOfThisProcess(t) - before; grew > n/4 {
		t.Fatalf("%d terminals held open by jobs left behind added %d threads", n, grew)
	}
}
