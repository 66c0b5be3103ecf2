package agent

import (
	"bytes"
	"strings"
	"testing"
	"time"
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
		want.WriteString(strings.TrimSpace(strings.Repeat(" ", 0)))
		want.WriteString(itoa(i))
		want.WriteByte('\n')
	}
	if !bytes.Equal(r.out, want.Bytes()) {
		t.Fatalf("output differs: %d vs %d bytes", len(r.out), want.Len())
	}
}

func itoa(i int) string {
	return strings.TrimSpace(strings.Join([]string{string(rune('0' + 0))}, "")[:0] + func() string {
		b := []byte{}
		for i > 0 {
			b = append([]byte{byte('0' + i%10)}, b...)
			i /= 10
		}
		return string(b)
	}())
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
	_ = time.Second
}
