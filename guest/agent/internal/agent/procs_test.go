package agent

import (
	"bytes"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
)

func TestBackgroundAttachReplay(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "echo out; sleep 0.2; echo err >&2", "background": true, "tag": "bg"})
	id, _ := r.resp["proc_id"].(string)
	if id == "" || num(r.resp["pid"]) <= 0 {
		t.Fatalf("resp %v", r.resp)
	}
	r = c.call(2, map[string]any{"op": "attach", "proc_id": id})
	if string(r.out) != "out\n" || string(r.err) != "err\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q err=%q resp=%v", r.out, r.err, r.resp)
	}
	if r.events[0]["event"] != "attached" || num(r.events[0]["offset"]) != 0 {
		t.Fatalf("events %v", r.events)
	}
	// replay from an offset
	r = c.call(3, map[string]any{"op": "attach", "proc_id": id, "offset": 2})
	if string(r.out)+string(r.err) != "t\nerr\n" {
		t.Fatalf("out=%q err=%q", r.out, r.err)
	}
	r = c.call(4, map[string]any{"op": "list_procs"})
	procs, _ := r.resp["procs"].([]any)
	if len(procs) != 1 || procs[0].(map[string]any)["tag"] != "bg" || num(procs[0].(map[string]any)["output_bytes"]) != 8 {
		t.Fatalf("procs %v", r.resp)
	}
	r = c.call(5, map[string]any{"op": "attach", "proc_id": "p999"})
	if r.resp["code"] != "not_found" {
		t.Fatalf("%v", r.resp)
	}
}

func TestAttachLostOffset(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "head -c 200000 /dev/zero", "background": true, "ring_bytes": 65536})
	id := r.resp["proc_id"].(string)
	c.call(9, map[string]any{"op": "attach", "proc_id": id, "output": false})
	r = c.call(2, map[string]any{"op": "attach", "proc_id": id})
	ev := r.events[0]
	if num(ev["offset"]) != 200000-65536 || num(ev["lost"]) != 200000-65536 || len(r.out) != 65536 {
		t.Fatalf("event %v, %d bytes", ev, len(r.out))
	}
}

// A background process never waits for a slow attachment: the attachment
// gets a gap event and continues from the ring's start.
func TestAttachGap(t *testing.T) {
	c := newClient(t, nil)
	c.credit = false
	r := c.call(1, map[string]any{"op": "exec", "cmd": "for i in $(seq 40); do head -c 32768 /dev/zero; sleep 0.02; done",
		"background": true, "ring_bytes": 65536})
	id := r.resp["proc_id"].(string)
	c.req(2, map[string]any{"op": "attach", "proc_id": id})
	got := 0
	deadline := time.Now().Add(10 * time.Second)
	for got < initialWindow && time.Now().Before(deadline) {
		f := c.next(2, 5*time.Second)
		if f.Kind == KindOut {
			got += len(f.Payload)
		}
	}
	if got != initialWindow {
		t.Fatalf("sent %d bytes without credit", got)
	}
	time.Sleep(2 * time.Second) // the process finishes meanwhile
	c.credit = true
	c.send(2, KindCredit, be32(1<<30))
	r = c.wait(2, 10*time.Second)
	gap := false
	for _, e := range r.events {
		if e["event"] == "gap" && num(e["lost"]) > 0 {
			gap = true
		}
	}
	if !gap || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("events %v resp %v", r.events, r.resp)
	}
}

// A foreground exec stops at the credit window and loses nothing.
func TestExecCreditBackpressure(t *testing.T) {
	c := newClient(t, nil)
	c.credit = false
	c.req(1, map[string]any{"op": "exec", "cmd": "head -c 3000000 /dev/urandom | od -An -tx1 -v"})
	var out bytes.Buffer
	for out.Len() < initialWindow {
		if f := c.next(1, 5*time.Second); f.Kind == KindOut {
			out.Write(f.Payload)
		}
	}
	select {
	case f := <-c.q(1):
		t.Fatalf("frame kind %d beyond the window", f.Kind)
	case <-time.After(300 * time.Millisecond):
	}
	c.credit = true
	c.send(1, KindCredit, be32(uint32(out.Len())))
	r := c.wait(1, 30*time.Second)
	total := out.Len() + len(r.out)
	if want := 3000000 / 16 * 49; total != want || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("got %d bytes, want %d; resp %v", total, want, r.resp)
	}
}

func TestKillEscalation(t *testing.T) {
	c := newClient(t, nil)
	armed := t.TempDir() + "/armed"
	r := c.call(1, map[string]any{"op": "exec", "cmd": "trap '' TERM; touch " + armed + "; while :; do sleep 0.05; done", "background": true})
	id := r.resp["proc_id"].(string)
	waitUntil(t, "the TERM trap is set", 10*time.Second, func() bool { return fileExists(armed) })
	start := time.Now()
	r = c.call(2, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 300})
	if num(r.resp["signal"]) != int64(syscall.SIGKILL) || time.Since(start) < 250*time.Millisecond {
		t.Fatalf("resp %v after %v", r.resp, time.Since(start))
	}
	r = c.call(3, map[string]any{"op": "exec", "argv": []string{"sleep", "30"}, "background": true})
	id = r.resp["proc_id"].(string)
	r = c.call(4, map[string]any{"op": "signal", "proc_id": id, "signal": int(syscall.SIGINT)})
	r = c.call(5, map[string]any{"op": "attach", "proc_id": id, "output": false})
	if num(r.resp["signal"]) != int64(syscall.SIGINT) {
		t.Fatalf("resp %v", r.resp)
	}
}

// A kill retried with a shorter grace (the first one's caller gave up) brings
// the SIGKILL forward instead of waiting out the first grace.
func TestKillRetriedWithAShorterGrace(t *testing.T) {
	c := newClient(t, nil)
	armed := t.TempDir() + "/armed"
	r := c.call(1, map[string]any{"op": "exec", "cmd": "trap '' TERM; touch " + armed + "; sleep 30", "background": true})
	id := r.resp["proc_id"]
	waitUntil(t, "the TERM trap is set", 10*time.Second, func() bool { return fileExists(armed) })
	c.req(2, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 20000})
	time.Sleep(300 * time.Millisecond)
	c.send(2, KindCancel, nil)
	c.wait(2, 5*time.Second)
	start := time.Now()
	r = c.call(3, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0})
	if num(r.resp["signal"]) != int64(syscall.SIGKILL) || time.Since(start) > 5*time.Second {
		t.Fatalf("resp %v after %v", r.resp, time.Since(start))
	}
}

// close_stdin on a terminal whose input is full (the program reads none)
// waits like any input would, but resize goes through meanwhile.
func TestResizeIsNotHeldByAPendingCloseStdin(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"sleep", "30"}, "pty": map[string]any{}, "background": true})
	id := r.resp["proc_id"]
	c.req(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true, "output": false})
	line := append(bytes.Repeat([]byte("y"), 1023), '\n')
	for i := 0; i < 200; i++ { // more than a terminal's input queue holds
		c.send(2, KindIn, line)
	}
	time.Sleep(500 * time.Millisecond)
	c.req(3, map[string]any{"op": "close_stdin", "proc_id": id})
	time.Sleep(300 * time.Millisecond) // close_stdin is waiting to write its ^D
	start := time.Now()
	if r := c.call(4, map[string]any{"op": "resize", "proc_id": id, "rows": 30, "cols": 100}); r.resp["ok"] != true || time.Since(start) > 3*time.Second {
		t.Fatalf("resize: %v after %v", r.resp, time.Since(start))
	}
	c.call(5, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0})
}

func TestAttachStdinAndCloseStdin(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"cat"}, "background": true, "stdin": true})
	id := r.resp["proc_id"].(string)
	c.req(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
	c.send(2, KindIn, []byte("via attach\n"))
	// close_stdin on another channel is not ordered after this one's input: it
	// is sent once cat has echoed the input back
	var out []byte
	for !bytes.Contains(out, []byte("via attach\n")) {
		switch f := c.next(2, 10*time.Second); f.Kind {
		case KindOut:
			out = append(out, f.Payload...)
		case KindResp, KindErr:
			t.Fatalf("frame %d %s before the echo (out %q)", f.Kind, f.Payload, out)
		}
	}
	c.call(3, map[string]any{"op": "close_stdin", "proc_id": id})
	r = c.wait(2, 10*time.Second)
	if string(out)+string(r.out) != "via attach\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q+%q resp=%v", out, r.out, r.resp)
	}
}

// Dropping the connection keeps a foreground process running; its output
// goes to the ring and a new connection can attach.
func TestConnectionDropKeepsProcess(t *testing.T) {
	srv := NewServer(time.Now())
	c := newClient(t, srv)
	c.req(1, map[string]any{"op": "exec", "cmd": "echo one; sleep 0.3; echo two"})
	f := c.next(1, 5*time.Second)
	if f.Kind != KindEvent || !strings.Contains(string(f.Payload), `"proc_id":"p1"`) {
		t.Fatalf("frame %d %s", f.Kind, f.Payload)
	}
	c.conn.Close()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return")
	}
	c2 := newClient(t, srv)
	r := c2.call(1, map[string]any{"op": "attach", "proc_id": "p1"})
	if string(r.out) != "one\ntwo\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

func TestHelloHealth(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(0, map[string]any{"op": "hello", "nonce": "abc"})
	if r.resp["nonce"] != "abc" || num(r.resp["protocol"]) != 1 || r.resp["version"] != Version {
		t.Fatalf("%v", r.resp)
	}
	if fmt.Sprint(r.resp["features"]) != "[watch_ready fs_names vsock_key]" {
		t.Fatalf("features %v", r.resp["features"])
	}
	r = c.call(1, map[string]any{"op": "health"})
	if r.resp["ok"] != true || r.resp["root_error"] != nil {
		t.Fatalf("%v", r.resp)
	}
	r = c.call(2, map[string]any{"op": "metrics"})
	if num(r.resp["mem_total_bytes"]) <= 0 {
		t.Fatalf("%v", r.resp)
	}
	r = c.call(3, map[string]any{"op": "shutdown"})
	if r.resp["code"] != "unsupported" {
		t.Fatalf("shutdown outside PID 1: %v", r.resp)
	}
	r = c.call(4, map[string]any{"op": "reseed", "entropy_b64": "AAAA"})
	if r.resp["code"] != "invalid" {
		t.Fatalf("%v", r.resp)
	}
	for i, bad := range []map[string]any{
		{"op": "setup_root", "root": "/etc/passwd"},
		{"op": "setup_root", "root": "/dev/../etc/shadow"},
		{"op": "setup_root", "root": "/dev/vda", "scratch": "vdb"},
		{"op": "setup_root"},
		{"op": "setup_root", "root": "/dev/vda", "extra": 1},
	} {
		if r = c.call(uint32(5+i), bad); r.resp["code"] != "invalid" {
			t.Fatalf("setup_root %v: %v", bad, r.resp)
		}
	}
	r = c.call(10, map[string]any{"op": "setup_root", "root": "/dev/vda"})
	if r.resp["code"] != "unsupported" {
		t.Fatalf("setup_root outside PID 1: %v", r.resp)
	}
}

// A host that dies without the guest seeing EOF (a restarted daemon reconnects
// first) must not leave channels behind: the new host's hello starts a fresh
// connection, and its channel ids may repeat the old host's.
func TestHelloFromANewHostDropsTheOldChannels(t *testing.T) {
	c := newClient(t, nil)
	c.call(0, map[string]any{"op": "hello", "nonce": "first"})
	bg := c.call(1, map[string]any{"op": "exec", "cmd": "cat", "background": true, "stdin": true})
	pid, _ := bg.resp["proc_id"].(string)
	// Old host: an attach left open on channel 2 (it would wait for the process forever).
	c.req(2, map[string]any{"op": "attach", "proc_id": pid, "stdin": true})
	c.next(2, 5*time.Second) // the "attached" event
	// New host, same stream, no EOF in between.
	c.call(0, map[string]any{"op": "hello", "nonce": "second"})
	r := c.call(2, map[string]any{"op": "health"})
	if r.resp["ok"] != true || r.resp["version"] != Version {
		t.Fatalf("channel 2 of the new host was not served: %v", r.resp)
	}
	c.call(3, map[string]any{"op": "kill", "proc_id": pid, "grace_ms": 100})
}

// While the guest is being set up the agent reads the host's hello but
// answers only once released; then it reports the boot steps it timed.
func TestHeldRequestsAreAnsweredOnRelease(t *testing.T) {
	srv := NewServer(time.Now())
	srv.Boot = newBootClock(srv.Start)
	release := srv.HoldRequests()
	c := newClient(t, srv)
	c.req(0, map[string]any{"op": "hello", "nonce": "early"})
	select {
	case f := <-c.q(0):
		t.Fatalf("answered before release: %s", f.Payload)
	case <-time.After(200 * time.Millisecond):
	}
	srv.Boot.Mark("root")
	release()
	r := c.wait(0, 5*time.Second)
	if r.resp["nonce"] != "early" {
		t.Fatalf("%v", r.resp)
	}
	phases, _ := r.resp["boot_phases_ms"].(map[string]any)
	if _, ok := phases["root"]; !ok {
		t.Fatalf("boot_phases_ms lacks the marked step: %v", r.resp)
	}
	if num(phases["agent_start_uptime"]) < 0 {
		t.Fatalf("agent_start_uptime negative: %v", phases)
	}
}

// attach with output:false answers once the output is complete too, not
// just the exit: a grandchild's output drained after the exit still counts.
func TestAttachWithoutOutputWaitsForTheOutput(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "(sleep 0.03; echo late) & echo early", "background": true})
	id := r.resp["proc_id"].(string)
	c.call(2, map[string]any{"op": "attach", "proc_id": id, "output": false})
	r = c.call(3, map[string]any{"op": "list_procs"})
	atEnd := num(r.resp["procs"].([]any)[0].(map[string]any)["output_bytes"])
	time.Sleep(300 * time.Millisecond)
	r = c.call(4, map[string]any{"op": "attach", "proc_id": id})
	if int64(len(r.out)) != atEnd {
		t.Fatalf("output_bytes %d right after the end, %q later", atEnd, r.out)
	}
}

// The output kept for exited processes is bounded: the oldest rings are
// freed first (a later attach reports their bytes as lost), the newest kept.
func TestExitedOutputIsBounded(t *testing.T) {
	defer func(b int64) { exitedRingBudget = b }(exitedRingBudget)
	exitedRingBudget = 512 << 10
	c := newClient(t, nil)
	var ids []string
	for i := 0; i < 4; i++ {
		r := c.call(uint32(1+2*i), map[string]any{"op": "exec", "cmd": "head -c 262144 /dev/zero",
			"background": true, "ring_bytes": 262144})
		id := r.resp["proc_id"].(string)
		c.call(uint32(2+2*i), map[string]any{"op": "attach", "proc_id": id, "output": false})
		ids = append(ids, id)
	}
	held := int64(0)
	for _, p := range c.srv.Procs.All() {
		held += p.ring.Held()
	}
	if held > exitedRingBudget+262144 {
		t.Fatalf("%d bytes of output held for exited processes", held)
	}
	r := c.call(20, map[string]any{"op": "attach", "proc_id": ids[0]})
	if num(r.events[0]["lost"]) != 262144 || len(r.out) != 0 || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("oldest: event %v, %d bytes, resp %v", r.events[0], len(r.out), r.resp)
	}
	r = c.call(21, map[string]any{"op": "attach", "proc_id": ids[3]})
	if len(r.out) != 262144 {
		t.Fatalf("newest: %d bytes", len(r.out))
	}
}

// Processes that end together: their rings close after their exits (here a
// job left behind holds each one's output for a while), when the budget was
// last applied. It is applied again as a ring closes.
func TestExitedOutputIsBoundedWhenProcessesEndTogether(t *testing.T) {
	defer func(b int64) { exitedRingBudget = b }(exitedRingBudget)
	exitedRingBudget = 512 << 10
	c := newClient(t, nil)
	var ids []string
	for i := 0; i < 8; i++ {
		r := c.call(uint32(1+i), map[string]any{"op": "exec", "background": true,
			"cmd": "head -c 262144 /dev/zero; sleep 1 & sleep 0.5", "ring_bytes": 262144})
		ids = append(ids, r.resp["proc_id"].(string))
	}
	for i, id := range ids {
		c.call(uint32(20+i), map[string]any{"op": "attach", "proc_id": id, "output": false})
	}
	held := func() int64 {
		n := int64(0)
		for _, p := range c.srv.Procs.All() {
			n += p.ring.Held()
		}
		return n
	}
	waitUntil(t, "the exited processes' output within its budget", 5*time.Second, func() bool {
		return held() <= exitedRingBudget+262144
	})
	r := c.call(40, map[string]any{"op": "attach", "proc_id": ids[7]})
	if len(r.out) != 262144 {
		t.Fatalf("newest: %d bytes", len(r.out))
	}
}

// A process started with a long script is listed (its argv cut, and said to
// be), so the host can still find, attach to and kill it. Such an entry was
// left out of the listing when its JSON did not fit one frame; `<>&` are
// escaped to six bytes each, so 6 KB of them was enough.
func TestListShowsAProcessWithALongCommandCut(t *testing.T) {
	c := newClient(t, nil)
	long := "sleep 30 # " + strings.Repeat("<&>", 2000) + strings.Repeat("é", 5000)
	r := c.call(1, map[string]any{"op": "exec", "cmd": long, "background": true})
	id := r.resp["proc_id"].(string)
	defer c.call(9, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0})
	r = c.call(2, map[string]any{"op": "list_procs"})
	procs, _ := r.resp["procs"].([]any)
	if len(procs) != 1 {
		t.Fatalf("listing %v", r.resp)
	}
	p := procs[0].(map[string]any)
	argv, _ := p["argv"].([]any)
	if p["proc_id"] != id || p["argv_truncated"] != true || len(argv) != 3 || argv[0] != "/bin/sh" {
		t.Fatalf("entry %v", p)
	}
	script := argv[2].(string)
	if !strings.HasPrefix(long, script) || !utf8.ValidString(script) || len(script) > listedArgvBytes {
		t.Fatalf("script cut to %d bytes: %q...", len(script), script[:40])
	}
	if got, cut := listedArgv([]string{"ls", "-l"}); cut || len(got) != 2 {
		t.Fatalf("short argv: %v %v", got, cut)
	}
	if got, cut := listedArgv(make([]string, 100000)); !cut || len(got) > listedArgvBytes/3 {
		t.Fatalf("many empty arguments: %d kept, cut %v", len(got), cut)
	}
}

// Input for a process without a stdin is refused, not credited and dropped.
func TestAttachWithStdinToAProcessWithoutOneIsRefused(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "sleep 30", "background": true})
	id := r.resp["proc_id"].(string)
	defer c.call(9, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0})
	r = c.call(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
	if r.resp["code"] != "invalid" || !strings.Contains(r.resp["error"].(string), "takes no stdin") {
		t.Fatalf("%v", r.resp)
	}
}
