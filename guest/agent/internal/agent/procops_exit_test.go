package agent

import (
	"runtime"
	"testing"
	"time"
)

// A detached attach with stdin:true leaves nothing behind: its stdin pump
// ends with the attachment, not with the process.
func TestAttachStdinEndsWithTheAttachment(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"cat"}, "background": true, "stdin": true})
	id := r.resp["proc_id"].(string)
	t.Cleanup(func() { c.call(9999, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0}) })
	time.Sleep(100 * time.Millisecond)
	before := runtime.NumGoroutine()
	for i := 0; i < 50; i++ {
		ch := uint32(10 + i)
		c.req(ch, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
		c.next(ch, 5*time.Second) // attached
		c.send(ch, KindCancel, nil)
		if r := c.wait(ch, 5*time.Second); r.resp["detached"] != true {
			t.Fatalf("resp %v", r.resp)
		}
	}
	// a detached attachment's goroutines end a moment later: given up to 5 s
	waitUntil(t, "the 50 detached attachments' goroutines end", 5*time.Second, func() bool {
		return runtime.NumGoroutine() <= before+5
	})
	// a later attachment's stdin still reaches the process
	c.req(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
	c.send(2, KindIn, []byte("still here\n"))
	c.send(2, KindEOF, nil)
	if r := c.wait(2, 5*time.Second); string(r.out) != "still here\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

// resize answers ok around and after the exit of a PTY process (nothing
// left to resize), never an error for a terminal closed under it.
func TestResizeAroundExit(t *testing.T) {
	c := newClient(t, nil)
	ch := uint32(1)
	call := func(req map[string]any) map[string]any {
		ch++
		return c.call(ch, req).resp
	}
	for i := 0; i < 10; i++ {
		id := call(map[string]any{"op": "exec", "cmd": "sleep 0.05", "background": true,
			"pty": map[string]any{"rows": 10, "cols": 20}})["proc_id"].(string)
		for j := 0; ; j++ {
			if r := call(map[string]any{"op": "resize", "proc_id": id, "rows": 30 + j%10, "cols": 90}); r["ok"] != true {
				t.Fatalf("resize of %s: %v", id, r)
			}
			if p := c.srv.Procs.Get(id); p.ended() {
				break
			}
		}
		if r := call(map[string]any{"op": "resize", "proc_id": id, "rows": 5, "cols": 5}); r["ok"] != true {
			t.Fatalf("resize after the end: %v", r)
		}
	}
}

// CANCEL on an attach to a process that has already ended answers its
// result (exit code and all), not detached: there is nothing to detach from.
func TestCancelledAttachToAnEndedProcessAnswersTheResult(t *testing.T) {
	c := newClient(t, nil)
	id := c.call(1, map[string]any{"op": "exec", "cmd": "echo out; exit 7", "background": true}).resp["proc_id"].(string)
	for !c.srv.Procs.Get(id).ended() {
		time.Sleep(10 * time.Millisecond)
	}
	for i := 0; i < 40; i++ {
		ch := uint32(10 + i)
		c.req(ch, map[string]any{"op": "attach", "proc_id": id, "output": i%2 == 0})
		c.send(ch, KindCancel, nil)
		if r := c.wait(ch, 5*time.Second); r.resp["detached"] != nil || num(r.resp["exit_code"]) != 7 {
			t.Fatalf("attach %d (output %v) cancelled after the end: resp %v", i, i%2 == 0, r.resp)
		}
	}
}
