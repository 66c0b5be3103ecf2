package agent

import (
	"encoding/json"
	"os"
	"strconv"
	"testing"
	"time"
)

// watch starts a watch on ch and waits until the agent says it is set up:
// the first frame, before any change.
func (c *client) watch(ch uint32, req map[string]any) {
	c.t.Helper()
	req["op"] = "watch"
	c.req(ch, req)
	if f := c.next(ch, 10*time.Second); f.Kind != KindEvent || string(f.Payload) != `{"event":"watching"}` {
		c.t.Fatalf("watch: first frame %d %s", f.Kind, f.Payload)
	}
}

// fsEvents gathers the watch's fs events on ch until none came for quiet.
func (c *client) fsEvents(ch uint32, quiet time.Duration) []map[string]any {
	c.t.Helper()
	var evs []map[string]any
	for {
		select {
		case f := <-c.q(ch):
			if f.Kind != KindEvent {
				c.t.Fatalf("watch sent kind %d: %s", f.Kind, f.Payload)
			}
			var m map[string]any
			if err := json.Unmarshal(f.Payload, &m); err != nil {
				c.t.Fatal(err)
			}
			evs = append(evs, m)
		case <-time.After(quiet):
			return evs
		}
	}
}

// A watch on one file keeps reporting across replaces (write_file's own,
// an editor's save-by-rename), a remove and a re-create, always under the
// watched path, and reports nothing about the file's neighbours (the
// temporary files of those replaces included).
func TestWatchFileSurvivesReplaces(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/f"
	os.WriteFile(p, []byte("0"), 0o644)
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": p})
	steps := []struct {
		what string
		do   func(i int)
		want string // an op among the step's events
	}{
		{"write_file", func(i int) { c.writeVia(uint32(10+i), map[string]any{"path": p}, "v"+strconv.Itoa(i)) }, "create"},
		{"write_file again", func(i int) { c.writeVia(uint32(10+i), map[string]any{"path": p}, "v"+strconv.Itoa(i)) }, "create"},
		{"direct write", func(int) { os.WriteFile(p, []byte("direct"), 0o644) }, "write"},
		{"editor save", func(int) { os.WriteFile(dir+"/.f.swp", []byte("ed"), 0o644); os.Rename(dir+"/.f.swp", p) }, "create"},
		{"chmod", func(int) { os.Chmod(p, 0o600) }, "chmod"},
		{"neighbour", func(int) { os.WriteFile(dir+"/g", []byte("g"), 0o644) }, ""},
		{"rename away", func(int) { os.Rename(p, dir+"/h") }, "rename"},
		{"re-create", func(int) { os.WriteFile(p, []byte("back"), 0o644) }, "create"},
		{"remove", func(int) { os.Remove(p) }, "remove"},
	}
	for i, s := range steps {
		s.do(i)
		evs := c.fsEvents(1, 300*time.Millisecond)
		seen := s.want == ""
		for _, ev := range evs {
			if ev["event"] != "fs" || ev["path"] != p {
				t.Fatalf("%s: event %v", s.what, ev)
			}
			seen = seen || ev["op"] == s.want
		}
		if !seen || s.want == "" && len(evs) > 0 {
			t.Fatalf("%s: want %q, got %v", s.what, s.want, evs)
		}
	}
	c.send(1, KindCancel, nil)
	if r := c.wait(1, 5*time.Second); r.resp["ok"] != true {
		t.Fatalf("%v", r.resp)
	}
}

// A watch on a symlink to a file reports changes to that file, under the
// path watched.
func TestWatchFileThroughSymlink(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(dir+"/real", 0o755)
	os.WriteFile(dir+"/real/f", []byte("0"), 0o644)
	os.Symlink("real/f", dir+"/link")
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": dir + "/link"})
	c.writeVia(2, map[string]any{"path": dir + "/link"}, "new")
	evs := c.fsEvents(1, 300*time.Millisecond)
	if len(evs) == 0 {
		t.Fatal("no event")
	}
	for _, ev := range evs {
		if ev["path"] != dir+"/link" {
			t.Fatalf("event %v", ev)
		}
	}
	c.send(1, KindCancel, nil)
	c.wait(1, 5*time.Second)
}

// A watch on one file says when its directory's event queue overflowed (the
// file's own changes may be among those lost): it was dropped as a
// neighbour's event, so a file watch never reported an overflow.
func TestFileWatchReportsAnOverflow(t *testing.T) {
	dir := t.TempDir()
	f, g := dir+"/f", dir+"/g"
	for _, p := range []string{f, g} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// a host that does not read while the changes happen: the agent stops
	// reading inotify once the socket is full, and the kernel's queue overflows
	host, guest := socketpair(t)
	go func() { _ = NewServer(time.Now()).ServeConn(guest); guest.Close() }()
	t.Cleanup(func() { host.Close() })
	req, _ := json.Marshal(map[string]any{"op": "watch", "path": f})
	if _, err := host.Write(EncodeFrame(1, KindReq, req)); err != nil {
		t.Fatal(err)
	}
	fr := NewFrameReader(host)
	if fw, err := fr.Read(); err != nil || string(fw.Payload) != `{"event":"watching"}` {
		t.Fatalf("%v %s", err, fw.Payload)
	}
	ff, _ := os.OpenFile(f, os.O_WRONLY|os.O_APPEND, 0)
	gf, _ := os.OpenFile(g, os.O_WRONLY|os.O_APPEND, 0)
	for i := 0; i < 60000; i++ { // alternating, so the kernel cannot merge them
		_, _ = ff.Write([]byte("x"))
		_, _ = gf.Write([]byte("y"))
	}
	ff.Close()
	gf.Close()
	ops := map[string]int{}
	for {
		_ = host.SetReadDeadline(time.Now().Add(time.Second))
		fw, err := fr.Read()
		if err != nil {
			break
		}
		var m map[string]any
		_ = json.Unmarshal(fw.Payload, &m)
		if m["path"] != f {
			t.Fatalf("an event not of the file: %s", fw.Payload)
		}
		ops[m["op"].(string)]++
	}
	if ops["overflow"] == 0 || ops["write"] == 0 {
		t.Fatalf("changes seen: %v", ops)
	}
}
