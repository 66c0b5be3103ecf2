package agent

import (
	"encoding/json"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pidFrom reads the pid a test's shell wrote to path (0 if none yet).
func pidFrom(path string) int {
	b, _ := os.ReadFile(path)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if pid <= 0 || err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// killPid ends a writer a test left behind, and waits until it is gone.
func killPid(t *testing.T, path string) {
	t.Helper()
	pid := pidFrom(path)
	if pid <= 1 {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 200 && alive(pid); i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

// escapee is a shell command whose child leaves the process group (setsid)
// and keeps writing to the exec's stdout every 10 ms: signals to the group
// never reach it and its output never pauses for drainIdle.
func escapee(pidf string) string {
	return "setsid sh -c 'echo $$ > " + pidf + "; while :; do echo x; sleep 0.01; done' & echo started"
}

// noFrames fails if channel ch got any frame within d (it has answered).
func (c *client) noFrames(ch uint32, d time.Duration) {
	c.t.Helper()
	select {
	case f := <-c.q(ch):
		c.t.Fatalf("frame kind %d on channel %d after its RESP: %q", f.Kind, ch, f.Payload)
	case <-time.After(d):
	}
}

// An escaped writer cannot hold an exec open: without a timeout the RESP
// comes drainCap after the exit; timeout_ms and CANCEL end it sooner. The
// writer is not killed (it left the group) and never gets SIGPIPE; what it
// writes after the RESP is discarded.
func TestExecEndsWhileAnEscapedChildKeepsWriting(t *testing.T) {
	dir := t.TempDir()
	c := newClient(t, nil)
	for i, tc := range []struct {
		name     string
		req      map[string]any
		cancelAt time.Duration
		min, max time.Duration
		timedOut bool
	}{
		{name: "plain", req: map[string]any{}, min: drainCap, max: drainCap + 2*time.Second},
		{name: "timeout", req: map[string]any{"timeout_ms": 500}, min: 500 * time.Millisecond,
			max: 500*time.Millisecond + drainIdle + 2*time.Second, timedOut: true},
		{name: "cancel", req: map[string]any{}, cancelAt: 300 * time.Millisecond, min: 300 * time.Millisecond,
			max: 300*time.Millisecond + drainIdle + 2*time.Second},
	} {
		ch := uint32(i + 1)
		pidf := dir + "/" + tc.name
		t.Cleanup(func() { killPid(t, pidf) })
		tc.req["op"], tc.req["cmd"] = "exec", escapee(pidf)
		start := time.Now()
		c.req(ch, tc.req)
		if tc.cancelAt > 0 {
			time.Sleep(tc.cancelAt)
			c.send(ch, KindCancel, nil)
		}
		r := c.wait(ch, 10*time.Second)
		d := time.Since(start)
		t.Logf("%s: RESP after %v", tc.name, d)
		if d < tc.min || d > tc.max {
			t.Errorf("%s: RESP after %v, want %v..%v", tc.name, d, tc.min, tc.max)
		}
		if !strings.Contains(string(r.out), "started\n") || num(r.resp["exit_code"]) != 0 ||
			r.resp["timed_out"] != tc.timedOut {
			t.Errorf("%s: out=%q resp=%v", tc.name, r.out, r.resp)
		}
		pid := pidFrom(pidf)
		time.Sleep(300 * time.Millisecond)
		if !alive(pid) {
			t.Errorf("%s: the escaped writer %d died after the RESP", tc.name, pid)
		}
		c.noFrames(ch, 10*time.Millisecond)
	}
}

// A background job of a foreground exec outlives the RESP: its output
// after the RESP is drained and discarded, it gets no SIGPIPE. The RESP
// comes drainIdle after the exit, not when the job ends.
func TestExecBackgroundJobSurvivesTheRESP(t *testing.T) {
	dir := t.TempDir()
	c := newClient(t, nil)
	start := time.Now()
	r := c.call(1, map[string]any{"op": "exec",
		"cmd": "(sleep 3; echo late; echo late >&2; touch " + dir + "/alive) & echo early"})
	if d := time.Since(start); d > 2500*time.Millisecond { // ~drainIdle, if not waiting
		t.Errorf("RESP after %v: waited for the background job", d)
	}
	if string(r.out) != "early\n" || len(r.err) != 0 || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q err=%q resp=%v", r.out, r.err, r.resp)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(dir + "/alive"); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("the background job was killed after the RESP")
		}
	}
	c.noFrames(1, 10*time.Millisecond)
}

// A group member that writes without pause cannot hold the RESP either
// (drainCap after the exit), and its later output does not reach the ring.
func TestExecEndsWhileAGroupMemberWritesWithoutPause(t *testing.T) {
	pidf := t.TempDir() + "/pid"
	t.Cleanup(func() { killPid(t, pidf) })
	c := newClient(t, nil)
	start := time.Now()
	c.req(1, map[string]any{"op": "exec", "cmd": "sh -c 'echo $$ > " + pidf + "; exec yes' & " +
		"until [ -s " + pidf + " ]; do sleep 0.01; done; sleep 0.1; echo started", "ring_bytes": 65536})
	var r result
	sent := 0
	for r.resp == nil { // counted, not kept: the host keeps up with yes
		if time.Since(start) > 15*time.Second {
			t.Fatalf("no RESP in 15 s, %d bytes", sent)
		}
		switch f := c.next(1, 10*time.Second); f.Kind {
		case KindOut:
			sent += len(f.Payload)
		case KindResp:
			if err := json.Unmarshal(f.Payload, &r.resp); err != nil {
				t.Fatal(err)
			}
		}
	}
	// duration_ms is the time to the exit
	d := time.Since(start) - time.Duration(num(r.resp["duration_ms"]))*time.Millisecond
	t.Logf("RESP %v after the exit, %d bytes", d, sent)
	if d < drainCap || d > drainCap+2*time.Second {
		t.Errorf("RESP %v after the exit", d)
	}
	if num(r.resp["exit_code"]) != 0 {
		t.Fatalf("resp=%v", r.resp)
	}
	id := r.resp["proc_id"].(string)
	out := func() int64 {
		r := c.call(2, map[string]any{"op": "list_procs"})
		for _, v := range r.resp["procs"].([]any) {
			if m := v.(map[string]any); m["proc_id"] == id {
				return num(m["output_bytes"])
			}
		}
		return -1
	}
	n := out()
	time.Sleep(200 * time.Millisecond)
	if !alive(pidFrom(pidf)) || out() != n || n != int64(sent) {
		t.Fatalf("after the RESP: writer alive %v, output_bytes %d then %d, %d sent",
			alive(pidFrom(pidf)), n, out(), sent)
	}
}

// The drain cap does not count time spent waiting for the host's credit:
// output the process left in the pipe when it exited is all delivered to
// a host that credits late, even while a group member holds the pipe open.
func TestExecDrainCapWaitsForASlowHost(t *testing.T) {
	c := newClient(t, nil)
	c.credit = false
	const n = 360000 // > window + ring, < window + ring + pipe
	c.req(1, map[string]any{"op": "exec", "cmd": "sleep 4 & head -c " + strconv.Itoa(n) + " /dev/zero",
		"ring_bytes": 65536})
	got := 0
	for got < initialWindow {
		if f := c.next(1, 5*time.Second); f.Kind == KindOut {
			got += len(f.Payload)
		}
	}
	time.Sleep(drainCap + 500*time.Millisecond)
	c.credit = true
	c.send(1, KindCredit, be32(uint32(got)))
	r := c.wait(1, 10*time.Second)
	if got+len(r.out) != n || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("%d of %d bytes, resp %v", got+len(r.out), n, r.resp)
	}
}

// Background processes end the same way: an attach answers drainCap after
// the exit while an escaped child still writes.
func TestAttachEndsWhileAnEscapedChildKeepsWriting(t *testing.T) {
	pidf := t.TempDir() + "/pid"
	t.Cleanup(func() { killPid(t, pidf) })
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": escapee(pidf), "background": true})
	id := r.resp["proc_id"].(string)
	start := time.Now()
	r = c.call(2, map[string]any{"op": "attach", "proc_id": id})
	if d := time.Since(start); d > drainCap+2*time.Second {
		t.Errorf("attach RESP after %v", d)
	}
	if !strings.Contains(string(r.out), "started\n") || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
	// signal and kill no longer reach anything once the process has ended
	if r = c.call(3, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0}); r.resp["ok"] != true {
		t.Fatalf("kill %v", r.resp)
	}
	time.Sleep(100 * time.Millisecond)
	if !alive(pidFrom(pidf)) {
		t.Fatal("the escaped writer died")
	}
}

func openFds() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

// Once the writers left behind exit, the pipes reach EOF and everything the
// exec held is released: no goroutine, no fd stays.
func TestExecReleasesEverythingWhenTheWritersExit(t *testing.T) {
	dir := t.TempDir()
	c := newClient(t, nil)
	c.call(100, map[string]any{"op": "health"})
	time.Sleep(100 * time.Millisecond)
	fds, gs := openFds(), runtime.NumGoroutine()
	for i := 0; i < 5; i++ {
		pidf := dir + "/" + strconv.Itoa(i)
		// one escaped writer, one group member: both outlive the RESP
		r := c.call(uint32(i+1), map[string]any{"op": "exec", "timeout_ms": 300,
			"cmd": "setsid sh -c 'echo $$ > " + pidf + "; for i in $(seq 15); do echo x; echo y >&2; sleep 0.05; done' & " +
				"(trap '' TERM; sleep 0.6; echo z) & echo started"})
		if r.resp["timed_out"] != true {
			t.Fatalf("resp %v", r.resp)
		}
	}
	for i := 0; i < 5; i++ {
		for j := 0; alive(pidFrom(dir + "/" + strconv.Itoa(i))); j++ {
			if j == 1000 {
				t.Fatalf("writer %d still running", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// the z job and the pumps end a moment later: given up to 5 s on a busy host
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		f, g := openFds(), runtime.NumGoroutine()
		if f <= fds && g <= gs+2 {
			break
		}
		if time.Now().After(end) {
			buf := make([]byte, 1<<20)
			t.Fatalf("fds %d -> %d, goroutines %d -> %d\n%s", fds, f, gs, g, buf[:runtime.Stack(buf, true)])
		}
	}
}
