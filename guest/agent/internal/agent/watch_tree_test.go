package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hasChange says whether evs holds op on path.
func hasChange(evs []map[string]any, op, path string) bool {
	for _, ev := range evs {
		if ev["op"] == op && ev["path"] == path {
			return true
		}
	}
	return false
}

// startWatch begins a recursive watch of dir on channel 1 and waits until its
// first walk is surely done.
func startWatch(t *testing.T, dir string) *client {
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": dir, "recursive": true})
	return c
}

// A tree moved into the watched one is reported whole (what was in it was
// made before its watch could be) and watched whole; so is one made with
// mkdir -p, however fast.
func TestRecursiveWatchTakesInNewTrees(t *testing.T) {
	w, src := t.TempDir(), t.TempDir()
	os.MkdirAll(src+"/tree/sub", 0o755)
	os.WriteFile(src+"/tree/sub/old", []byte("x"), 0o644)
	c := startWatch(t, w)
	if err := os.Rename(src+"/tree", w+"/tree"); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(w+"/made/a/b", 0o755)
	evs := c.fsEvents(1, 300*time.Millisecond)
	for _, p := range []string{"/tree", "/tree/sub", "/tree/sub/old", "/made", "/made/a", "/made/a/b"} {
		if !hasChange(evs, "create", w+p) {
			t.Fatalf("no create of %s in %v", p, evs)
		}
	}
	os.WriteFile(w+"/tree/sub/f", []byte("x"), 0o644)
	os.WriteFile(w+"/made/a/b/g", []byte("x"), 0o644)
	evs = c.fsEvents(1, 300*time.Millisecond)
	if !hasChange(evs, "create", w+"/tree/sub/f") || !hasChange(evs, "create", w+"/made/a/b/g") {
		t.Fatalf("changes deep in the new trees: %v", evs)
	}
}

// A directory renamed inside the tree is still watched, under its new path,
// and so is what is under it; one moved out is not watched any more.
func TestRecursiveWatchFollowsRenames(t *testing.T) {
	w, out := t.TempDir(), t.TempDir()
	os.MkdirAll(w+"/a/deep", 0o755)
	os.MkdirAll(w+"/gone", 0o755)
	c := startWatch(t, w)
	os.Rename(w+"/a", w+"/b")
	os.Rename(w+"/gone", out+"/gone")
	evs := c.fsEvents(1, 300*time.Millisecond)
	if !hasChange(evs, "rename", w+"/a") || !hasChange(evs, "create", w+"/b") || !hasChange(evs, "rename", w+"/gone") {
		t.Fatalf("renames: %v", evs)
	}
	os.WriteFile(w+"/b/f", []byte("x"), 0o644)
	os.WriteFile(w+"/b/deep/g", []byte("x"), 0o644)
	os.WriteFile(out+"/gone/h", []byte("x"), 0o644)
	evs = c.fsEvents(1, 300*time.Millisecond)
	if !hasChange(evs, "create", w+"/b/f") || !hasChange(evs, "create", w+"/b/deep/g") {
		t.Fatalf("changes in the renamed directory: %v", evs)
	}
	for _, ev := range evs {
		if ev["path"] == w+"/gone/h" || ev["path"] == out+"/gone/h" {
			t.Fatalf("a directory moved out is still reported: %v", evs)
		}
	}
}

// The directory limit counts the directories watched now: a tree whose
// directories came and went many times over keeps being watched. Past the
// limit, the watch says it is missing changes.
func TestRecursiveWatchLimitCountsLiveDirectories(t *testing.T) {
	defer func(n int) { maxWatchDirs = n }(maxWatchDirs)
	maxWatchDirs = 100
	w := t.TempDir()
	c := startWatch(t, w)
	for i := 0; i < 10; i++ {
		for j := 0; j < 50; j++ {
			os.Mkdir(fmt.Sprintf("%s/d%d", w, j), 0o755)
		}
		time.Sleep(20 * time.Millisecond)
		for j := 0; j < 50; j++ {
			os.Remove(fmt.Sprintf("%s/d%d", w, j))
		}
	}
	os.Mkdir(w+"/last", 0o755)
	time.Sleep(200 * time.Millisecond)
	os.WriteFile(w+"/last/f", []byte("x"), 0o644)
	evs := c.fsEvents(1, 500*time.Millisecond)
	if hasChange(evs, "overflow", w) || !hasChange(evs, "create", w+"/last/f") {
		t.Fatalf("500 directories made and removed, 50 at a time: %v", evs[max(0, len(evs)-5):])
	}
	for j := 0; j < maxWatchDirs+10; j++ {
		os.Mkdir(fmt.Sprintf("%s/e%d", w, j), 0o755)
	}
	if evs := c.fsEvents(1, 500*time.Millisecond); !hasChange(evs, "overflow", w) {
		t.Fatalf("past the limit, no overflow: %v", evs[max(0, len(evs)-5):])
	}
	c.send(1, KindCancel, nil)
	c.wait(1, 5*time.Second) // ended before the limit is put back
}

// The watched directory going away ends the watch, with that change: nothing
// more can come under its path.
func TestWatchEndsWhenItsDirectoryGoes(t *testing.T) {
	for _, how := range []string{"remove", "rename"} {
		base := t.TempDir()
		w := base + "/w"
		os.Mkdir(w, 0o755)
		c := newClient(t, nil)
		c.watch(1, map[string]any{"path": w, "recursive": true})
		if how == "remove" {
			os.Remove(w)
		} else {
			os.Rename(w, base+"/elsewhere")
		}
		r := c.wait(1, 5*time.Second)
		if r.resp["ok"] != true || r.resp["ended"] == nil || !hasChange(r.events, how, w) {
			t.Fatalf("%s: %v, events %v", how, r.resp, r.events)
		}
	}
}

// write_file's own temporary file never shows in a watch: a write into a
// watched directory is the create of its target.
func TestWatchHidesWriteFilesTemporaryFile(t *testing.T) {
	w := t.TempDir()
	c := startWatch(t, w)
	c.writeVia(2, map[string]any{"path": w + "/f"}, "one")
	c.writeVia(3, map[string]any{"path": w + "/f"}, "two")
	evs := c.fsEvents(1, 300*time.Millisecond)
	if !hasChange(evs, "create", w+"/f") {
		t.Fatalf("no create of the target: %v", evs)
	}
	for _, ev := range evs {
		if ev["path"] != w+"/f" {
			t.Fatalf("event for another path: %v", evs)
		}
	}
	if !isTempName(".f.isorun-0123456789ab") || isTempName(".f.isorun-0123") || isTempName("f.isorun-0123456789ab") {
		t.Fatal("isTempName")
	}
}

// readOnce handles what one read of w's inotify fd gives.
func readOnce(t *testing.T, w *treeWatch) []fsChange {
	t.Helper()
	time.Sleep(20 * time.Millisecond) // the changes made just before are queued
	buf := make([]byte, 64<<10)
	n, err := unix.Read(w.fd, buf)
	if err == unix.EAGAIN {
		return nil
	} else if err != nil {
		t.Fatal(err)
	}
	var got []fsChange
	w.handle(buf[:n], func(c fsChange) bool { got = append(got, c); return true })
	return got
}

func reported(got []fsChange, path string) bool {
	for _, c := range got {
		if c.path == path {
			return true
		}
	}
	return false
}

// A directory moved out, and another made or renamed to its old path in the
// same read (a build dir rotated): the newcomer is watched, the one moved out
// is not (its changes are not reported under the path it left).
func TestRecursiveWatchMoveOutThenReuseThePath(t *testing.T) {
	for _, reuse := range []string{"mkdir", "rename"} {
		w, out := t.TempDir(), t.TempDir()
		os.MkdirAll(w+"/a/deep", 0o755)
		os.MkdirAll(w+"/c", 0o755)
		tw, err := newTreeWatch(w, true, func() bool { return false })
		if err != nil {
			t.Fatal(err)
		}
		tw.addTree(w, false, func(fsChange) bool { return true })
		os.Rename(w+"/a", out+"/a")
		if reuse == "mkdir" {
			os.Mkdir(w+"/a", 0o755)
		} else {
			os.Rename(w+"/c", w+"/a")
		}
		readOnce(t, tw)
		os.WriteFile(out+"/a/outside", []byte("x"), 0o644)
		os.WriteFile(out+"/a/deep/outside", []byte("x"), 0o644)
		os.WriteFile(w+"/a/inside", []byte("x"), 0o644)
		got := readOnce(t, tw)
		if !reported(got, w+"/a/inside") || reported(got, w+"/a/outside") || reported(got, w+"/a/deep/outside") {
			t.Fatalf("%s: %v", reuse, got)
		}
		tw.Close()
	}
}

// A file's watch reports the file only: its directory's own changes (a chmod,
// a touch) are not the file's; the directory going away is.
func TestFileWatchIgnoresItsDirectorysOwnChanges(t *testing.T) {
	d := t.TempDir() + "/d"
	os.Mkdir(d, 0o755)
	os.WriteFile(d+"/f", []byte("x"), 0o644)
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": d + "/f"})
	os.Chmod(d, 0o700)
	if evs := c.fsEvents(1, 300*time.Millisecond); len(evs) > 0 {
		t.Fatalf("directory chmod: %v", evs)
	}
	os.RemoveAll(d)
	r := c.wait(1, 5*time.Second)
	if r.resp["ended"] == nil || !hasChange(r.events, "remove", d+"/f") {
		t.Fatalf("directory removed: %v %v", r.resp, r.events)
	}
}

// The limit is said each time it is reached, not once per watch.
func TestRecursiveWatchSaysTheLimitEachTime(t *testing.T) {
	defer func(n int) { maxWatchDirs = n }(maxWatchDirs)
	maxWatchDirs = 3
	w := t.TempDir()
	c := startWatch(t, w)
	overflows := func() (n int) {
		for _, ev := range c.fsEvents(1, 300*time.Millisecond) {
			if ev["op"] == "overflow" {
				n++
			}
		}
		return n
	}
	for round := 0; round < 2; round++ {
		for i := 0; i < 4; i++ {
			os.Mkdir(fmt.Sprintf("%s/d%d", w, i), 0o755)
		}
		if n := overflows(); n != 1 {
			t.Fatalf("round %d: %d overflows", round, n)
		}
		for i := 0; i < 4; i++ {
			os.Remove(fmt.Sprintf("%s/d%d", w, i))
		}
		overflows()
	}
	c.send(1, KindCancel, nil)
	c.wait(1, 5*time.Second)
}

// A recursive watch of a symlink to a directory watches the tree, under the
// link's name; a trailing slash on the path is not in what is reported.
func TestRecursiveWatchOfALinkAndOfAPathWithASlash(t *testing.T) {
	base := t.TempDir()
	os.MkdirAll(base+"/real/sub", 0o755)
	os.Symlink(base+"/real", base+"/link")
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": base + "/link", "recursive": true})
	os.WriteFile(base+"/real/sub/f", []byte("x"), 0o644)
	if evs := c.fsEvents(1, 300*time.Millisecond); !hasChange(evs, "create", base+"/link/sub/f") {
		t.Fatalf("through the link: %v", evs)
	}
	c.watch(2, map[string]any{"path": base + "/real/sub/", "recursive": true})
	os.RemoveAll(base + "/real/sub")
	r := c.wait(2, 5*time.Second)
	if !hasChange(r.events, "remove", base+"/real/sub") {
		t.Fatalf("end of a watch given with a slash: %v", r.events)
	}
}

// An exchange of two watched directories (renameat2 RENAME_EXCHANGE, `mv
// --exchange`) is two renames in one read: a to b, b to a. The first took the
// watches at b for a replaced directory's and dropped them, so afterwards what
// changed in the one now at b was reported under a, and in the other not at all.
func TestAnExchangeOfTwoWatchedDirectoriesKeepsBothWatched(t *testing.T) {
	w := t.TempDir()
	for _, d := range []string{"/a/deep", "/b"} {
		if err := os.MkdirAll(w+d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c := startWatch(t, w)
	if err := unix.Renameat2(unix.AT_FDCWD, w+"/a", unix.AT_FDCWD, w+"/b", unix.RENAME_EXCHANGE); err != nil {
		t.Skipf("renameat2 RENAME_EXCHANGE: %v", err)
	}
	c.fsEvents(1, 300*time.Millisecond)
	for _, f := range []string{"/a/in_old_b", "/b/in_old_a", "/b/deep/deeper"} {
		if err := os.WriteFile(w+f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	evs := c.fsEvents(1, 300*time.Millisecond)
	for _, f := range []string{"/a/in_old_b", "/b/in_old_a", "/b/deep/deeper"} {
		if !hasChange(evs, "create", w+f) {
			t.Errorf("create of %s not reported: %v", f, evs)
		}
	}
	if len(evs) != 3 { // a create of each (empty: no write)
		t.Errorf("%d changes for 3 files: %v", len(evs), evs)
	}
}

// A directory made while the kernel's queue overflowed (the host stopped
// reading) is watched once the overflow is reported: changes in it were missed
// for good, with no further overflow to say so.
func TestADirectoryMadeDuringAnOverflowIsWatched(t *testing.T) {
	w := t.TempDir()
	srv := NewServer(time.Now())
	a, b := socketpair(t)
	go func() { _ = srv.ServeConn(b); b.Close() }()
	req, _ := json.Marshal(map[string]any{"op": "watch", "path": w, "recursive": true})
	if _, err := a.Write(EncodeFrame(1, KindReq, req)); err != nil {
		t.Fatal(err)
	}
	if f, err := NewFrameReader(a).Read(); err != nil || string(f.Payload) != `{"event":"watching"}` {
		t.Fatalf("first frame %v %s", err, f.Payload)
	}
	// the host reads nothing: the agent's writes back up, then its inotify queue (16384)
	for i := 0; i < 20000; i++ {
		if err := os.WriteFile(fmt.Sprintf("%s/f%05d", w, i), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(w+"/newdir", 0o755); err != nil {
		t.Fatal(err)
	}
	c := &client{t: t, conn: a, chans: map[uint32]chan Frame{}, credit: true, done: make(chan error, 1), srv: srv}
	go c.readLoop()
	t.Cleanup(func() { c.mu.Lock(); c.finished = true; c.mu.Unlock(); a.Close() })
	if evs := c.fsEvents(1, 1500*time.Millisecond); !hasChange(evs, "overflow", w) {
		t.Fatalf("no overflow in %d changes", len(evs))
	}
	if err := os.WriteFile(w+"/newdir/inside", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if evs := c.fsEvents(1, 500*time.Millisecond); !hasChange(evs, "create", w+"/newdir/inside") {
		t.Fatalf("a file made in a directory created during the overflow: %v", evs)
	}
}

// A chmod of a watched subdirectory is one change (inotify says it twice: on
// the parent's watch by name and on the subdirectory's own), and one of the
// watched directory itself is named without the slash the request gave.
func TestAChmodIsReportedOnceAndTheRootWithoutItsSlash(t *testing.T) {
	w := t.TempDir()
	if err := os.Mkdir(w+"/sub", 0o755); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": w + "/", "recursive": true})
	if err := os.Chmod(w+"/sub", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(w, 0o700); err != nil {
		t.Fatal(err)
	}
	evs := c.fsEvents(1, 300*time.Millisecond)
	if len(evs) != 2 || !hasChange(evs, "chmod", w+"/sub") || !hasChange(evs, "chmod", w) {
		t.Fatalf("want one chmod of %s/sub and one of %s: %v", w, w, evs)
	}
}

// The watched directory removed while a process still has it as its cwd (a
// shell or dev server in the project): the kernel says IN_DELETE_SELF only
// when that process lets go, and the watch neither told of the remove nor
// ended until then. A file's watch (on its directory) ends with it too.
func TestAWatchEndsWhenItsDirectoryIsRemovedWhileInUse(t *testing.T) {
	for _, file := range []bool{false, true} {
		d := t.TempDir() + "/proj"
		os.Mkdir(d, 0o755)
		path := d
		if file {
			path = d + "/f"
			os.WriteFile(path, nil, 0o644)
		}
		user := exec.Command("sleep", "30")
		user.Dir = d
		if err := user.Start(); err != nil {
			t.Fatal(err)
		}
		c := newClient(t, nil)
		c.watch(1, map[string]any{"path": path, "recursive": !file})
		if err := os.RemoveAll(d); err != nil {
			t.Fatal(err)
		}
		r := c.wait(1, 5*time.Second)
		user.Process.Kill()
		user.Wait()
		if r.resp["ok"] != true || r.resp["ended"] == nil || !hasChange(r.events, "remove", path) {
			t.Fatalf("file=%v: %v, events %v", file, r.resp, r.events)
		}
	}
}
