package agent

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestExecBasic(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "echo hi; echo err >&2; exit 3"})
	if string(r.out) != "hi\n" || string(r.err) != "err\n" {
		t.Fatalf("out=%q err=%q", r.out, r.err)
	}
	if r.resp["ok"] != true || num(r.resp["exit_code"]) != 3 || r.resp["signal"] != nil {
		t.Fatalf("resp %v", r.resp)
	}
	if len(r.events) == 0 || r.events[0]["event"] != "started" {
		t.Fatalf("events %v", r.events)
	}
}

func TestExecLargeOutput(t *testing.T) {
	c := newClient(t, nil)
	const n = 20 << 20
	r := c.call(1, map[string]any{"op": "exec", "cmd": "head -c 20971520 /dev/zero; echo done >&2"})
	if len(r.out) != n || string(r.err) != "done\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("got %d bytes, err=%q resp=%v", len(r.out), r.err, r.resp)
	}
}

func TestExecOrderedOutput(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"seq", "1", "200000"}})
	var want bytes.Buffer
	for i := 1; i <= 200000; i++ {
		want.WriteString(strconv.Itoa(i))
		want.WriteByte('\n')
	}
	if !bytes.Equal(r.out, want.Bytes()) {
		t.Fatalf("output differs: %d vs %d bytes", len(r.out), want.Len())
	}
}

func TestExecMissingProgram(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"no-such-program-xyz"}})
	if num(r.resp["exit_code"]) != 127 || !strings.HasPrefix(string(r.err), "isorun-agent: ") {
		t.Fatalf("resp=%v err=%q", r.resp, r.err)
	}
	r = c.call(2, map[string]any{"op": "exec", "argv": []string{"/etc/passwd"}})
	if num(r.resp["exit_code"]) != 126 {
		t.Fatalf("not executable: %v", r.resp)
	}
	r = c.call(3, map[string]any{"op": "exec", "argv": []string{"true"}, "cwd": "/no/such/dir"})
	if num(r.resp["exit_code"]) != 127 {
		t.Fatalf("bad cwd: %v %q", r.resp, r.err)
	}
}

func TestExecCommandLineStartingLikeAnOption(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "-x"})
	if num(r.resp["exit_code"]) != 127 || !strings.Contains(string(r.err), "-x") {
		t.Fatalf("resp=%v err=%q", r.resp, r.err)
	}
	r = c.call(2, map[string]any{"op": "exec", "cmd": "+e; echo ran"})
	if string(r.out) != "ran\n" {
		t.Fatalf("out=%q err=%q", r.out, r.err)
	}
}

func TestExecStdin(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "argv": []string{"cat"}, "stdin": true})
	c.send(1, KindIn, []byte("hello "))
	c.send(1, KindIn, []byte("world"))
	c.send(1, KindEOF, nil)
	r := c.wait(1, 10*time.Second)
	if string(r.out) != "hello world" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
	// the agent credits the IN bytes it handed on
	credited := 0
	for _, k := range r.order {
		if k == KindCredit {
			credited++
		}
	}
	if credited == 0 {
		t.Fatalf("no CREDIT for stdin: %v", r.order)
	}
}

func TestExecTimeoutAndSignal(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"sleep", "30"}, "timeout_ms": 100})
	if r.resp["timed_out"] != true || num(r.resp["signal"]) != int64(syscall.SIGTERM) || r.resp["exit_code"] != nil {
		t.Fatalf("resp %v", r.resp)
	}
	if num(r.resp["run_us"]) <= 0 {
		t.Fatalf("run_us %v", r.resp)
	}
}

// A process that closes its output and runs on (`exec >log 2>&1`, a daemon)
// is still timed: the timeout is the process's, not its output's.
func TestExecTimeoutHoldsAfterTheOutputClosed(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "cmd": "exec sleep 30 >/dev/null 2>&1", "timeout_ms": 300})
	if r := c.wait(1, 10*time.Second); r.resp["timed_out"] != true || num(r.resp["signal"]) != int64(syscall.SIGTERM) {
		t.Fatalf("resp %v", r.resp)
	}
}

func TestExecCancel(t *testing.T) {
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "exec", "cmd": "echo start; sleep 30"})
	for f := c.next(1, 5*time.Second); f.Kind != KindOut; f = c.next(1, 5*time.Second) {
	}
	c.send(1, KindCancel, nil)
	r := c.wait(1, 10*time.Second)
	if r.resp["signal"] == nil {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

// The host forgets a channel at its CANCEL and credits nothing more: an exec
// whose window is spent must still end (process, ring cursor, RESP) instead of
// waiting on credit for good, with the process's output pump behind it.
func TestExecCancelWithItsWindowSpent(t *testing.T) {
	for _, tc := range []struct{ name, cmd string }{
		{"running", "yes"},
		{"exited", "head -c 900000 /dev/zero"}, // all in its ring, the tail unsent
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(t, nil)
			c.credit = false
			c.req(1, map[string]any{"op": "exec", "cmd": tc.cmd, "ring_bytes": 4 << 20})
			for got := 0; got < initialWindow; {
				if f := c.next(1, 5*time.Second); f.Kind == KindOut {
					got += len(f.Payload)
				}
			}
			time.Sleep(500 * time.Millisecond) // the ring fills (yes) or the process ends
			c.send(1, KindCancel, nil)
			r := c.wait(1, 10*time.Second)
			if r.resp["ok"] != true {
				t.Fatalf("resp %v", r.resp)
			}
			p := c.srv.Procs.Get("p1")
			select {
			case <-p.exited:
			case <-time.After(5 * time.Second):
				t.Fatal("the process outlived its cancelled exec")
			}
			// and the output can still be asked for: the ring is closed, not wedged
			a := c.call(2, map[string]any{"op": "attach", "proc_id": "p1", "output": false})
			if a.resp["ok"] != true {
				t.Fatalf("attach %v", a.resp)
			}
		})
	}
}

func TestExecPTY(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "test -t 0 && stty size && echo $TERM",
		"pty": map[string]any{"rows": 33, "cols": 77}})
	if !strings.Contains(string(r.out), "33 77") || !strings.Contains(string(r.out), "xterm") {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

// Input that ends without a newline still ends: on a terminal one ^D only
// hands a partial line over (cat waited for its timeout).
func TestExecPTYStdinWithoutAFinalNewlineEnds(t *testing.T) {
	c := newClient(t, nil)
	for i, in := range []string{"abc", "abc\n", ""} {
		ch := uint32(1 + i)
		c.req(ch, map[string]any{"op": "exec", "argv": []string{"cat"}, "pty": map[string]any{},
			"stdin": true, "timeout_ms": 5000})
		if in != "" {
			c.send(ch, KindIn, []byte(in))
		}
		c.send(ch, KindEOF, nil)
		r := c.wait(ch, 10*time.Second)
		if r.resp["timed_out"] == true || num(r.resp["exit_code"]) != 0 {
			t.Fatalf("input %q: out=%q resp=%v", in, r.out, r.resp)
		}
	}
}

func TestExecEnvCwdDefaults(t *testing.T) {
	c := newClient(t, nil)
	c.call(1, map[string]any{"op": "set_defaults", "env": map[string]string{"A": "1", "B": "2"}, "cwd": "/tmp"})
	r := c.call(2, map[string]any{"op": "exec", "cmd": "echo $A$B $PATH; pwd", "env": map[string]string{"B": "3"}})
	want := "13 " + defaultPath + "\n/tmp\n"
	if string(r.out) != want {
		t.Fatalf("out=%q", r.out)
	}
}

func TestExecInvalid(t *testing.T) {
	c := newClient(t, nil)
	for i, req := range []map[string]any{
		{"op": "exec"},
		{"op": "exec", "cmd": "true", "argv": []string{"true"}},
		{"op": "exec", "cmd": "true", "bogus": 1},
		{"op": "exec", "cmd": 5},
		{"op": "exec", "cmd": "true", "timeout_ms": -1},
		{"op": "exec", "cmd": "true", "timeout_ms": int64(18446744073710)},
		{"op": "nope"},
		{"op": "attach", "proc_id": "p1", "signal": 1},
	} {
		r := c.call(uint32(i+1), req)
		if r.resp["ok"] != false || r.resp["code"] != "invalid" {
			t.Fatalf("%v: %v", req, r.resp)
		}
	}
	c.send(99, KindReq, []byte("not json"))
	if r := c.wait(99, 5*time.Second); r.resp["code"] != "invalid" {
		t.Fatalf("%v", r.resp)
	}
}

// A PTY exec ends like a piped one when its process exits, even if a
// grandchild (here one ignoring SIGHUP) keeps the terminal open: the
// master's pump must stay interruptible so the post-exit drain applies.
func TestExecPTYEndsWhileAGrandchildHoldsTheTerminal(t *testing.T) {
	c := newClient(t, nil)
	start := time.Now()
	r := c.call(1, map[string]any{"op": "exec", "cmd": "trap '' HUP; sleep 10 & echo hi",
		"pty": map[string]any{"rows": 24, "cols": 80}})
	if !strings.Contains(string(r.out), "hi") || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Fatalf("RESP after %v: waited for the grandchild", d)
	}
}

// Resizing a PTY session reaches the process.
func TestResizePTY(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "read x; stty size", "stdin": true,
		"background": true, "pty": map[string]any{"rows": 10, "cols": 20}})
	id := r.resp["proc_id"].(string)
	if r = c.call(2, map[string]any{"op": "resize", "proc_id": id, "rows": 50, "cols": 120}); r.resp["ok"] != true {
		t.Fatalf("resize %v", r.resp)
	}
	c.req(3, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
	c.send(3, KindIn, []byte("\n"))
	r = c.wait(3, 10*time.Second)
	if !strings.Contains(string(r.out), "50 120") {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

// A bad cwd is reported as the cwd, not as the program (which exists).
func TestExecBadCwdNamesTheCwd(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"true"}, "cwd": "/no/such/dir"})
	if num(r.resp["exit_code"]) != 127 || !strings.Contains(string(r.err), "/no/such/dir") {
		t.Fatalf("resp=%v err=%q", r.resp, r.err)
	}
	r = c.call(2, map[string]any{"op": "exec", "argv": []string{"true"}, "cwd": "/etc/passwd"})
	if num(r.resp["exit_code"]) != 127 || !strings.Contains(string(r.err), "cwd /etc/passwd: not a directory") {
		t.Fatalf("resp=%v err=%q", r.resp, r.err)
	}
}

// Once the process itself has exited, its group may still hold the output
// open (a background loop that keeps writing). timeout_ms and CANCEL must
// still end the exec: they signal the group, not just a live leader.
func TestExecTimeoutAndCancelReachAGroupThatOutlivesTheLeader(t *testing.T) {
	c := newClient(t, nil)
	loop := "while :; do echo x; sleep 0.01; done & echo started"
	c.req(1, map[string]any{"op": "exec", "cmd": loop, "timeout_ms": 300})
	if r := c.wait(1, 5*time.Second); r.resp["timed_out"] != true {
		t.Fatalf("timeout: %v", r.resp)
	}
	c.req(2, map[string]any{"op": "exec", "cmd": loop})
	for f := c.next(2, 5*time.Second); f.Kind != KindOut; f = c.next(2, 5*time.Second) {
	}
	time.Sleep(200 * time.Millisecond) // the leader has exited by now
	c.send(2, KindCancel, nil)
	if r := c.wait(2, 5*time.Second); r.resp["ok"] != true {
		t.Fatalf("cancel: %v", r.resp)
	}
}

// A command's stdout and stderr pipes hold outPipeSize: under TCG each switch
// between a flooding writer and the agent is dear (the setting is best effort,
// so a mistake in it would fail silently but for this).
func TestOutputPipesAreWidened(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec",
		"argv": []string{os.Args[0], "-test.run=^TestHelperPrintsItsPipeSizes$"},
		"env":  map[string]string{"ISORUN_PIPE_SIZE_HELPER": "1"}})
	want := fmt.Sprintf("%d\n", outPipeSize)
	if string(r.out) != want || string(r.err) != want {
		t.Fatalf("out=%q err=%q resp=%v", r.out, r.err, r.resp)
	}
}

// TestHelperPrintsItsPipeSizes is the child of TestOutputPipesAreWidened.
func TestHelperPrintsItsPipeSizes(t *testing.T) {
	if os.Getenv("ISORUN_PIPE_SIZE_HELPER") != "1" {
		t.Skip("run by TestOutputPipesAreWidened")
	}
	for _, fd := range []int{1, 2} {
		n, err := unix.FcntlInt(uintptr(fd), unix.F_GETPIPE_SZ, 0)
		if err != nil {
			n = -1
		}
		fmt.Fprintf(os.NewFile(uintptr(fd), ""), "%d\n", n)
	}
	os.Exit(0)
}

// An exec's cwd with ".." after a link is where the kernel's chdir goes, for a
// relative cwd as for an absolute one and a files path (a relative one was
// joined as text), and a relative program is found there.
func TestACwdWithDotDotAfterALinkIsTheKernels(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.MkdirAll(dir+"/o/deep", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("o/deep", dir+"/ldeep"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/o/run.sh", []byte("#!/bin/sh\necho ran\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c.call(1, map[string]any{"op": "set_defaults", "cwd": dir})
	for i, cwd := range []string{"ldeep/..", dir + "/ldeep/.."} {
		r := c.call(uint32(i+2), map[string]any{"op": "exec", "argv": []string{"./run.sh"}, "cwd": cwd})
		if string(r.out) != "ran\n" {
			t.Errorf("cwd %s: %q %q %v", cwd, r.out, r.err, r.resp)
		}
		r = c.call(uint32(i+4), map[string]any{"op": "exec", "cmd": "pwd -P", "cwd": cwd})
		if string(r.out) != dir+"/o\n" {
			t.Errorf("cwd %s: pwd -P %q %q", cwd, r.out, r.err)
		}
	}
	r := c.call(6, map[string]any{"op": "exec", "cmd": "true", "cwd": "ldeep/../run.sh/.."})
	if num(r.resp["exit_code"]) != 127 || !strings.Contains(string(r.err), "not a directory") {
		t.Errorf("cwd through a file: %q %v", r.err, r.resp)
	}
}
