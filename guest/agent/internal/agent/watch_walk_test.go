package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inotifyWatches counts the inotify watches this process holds.
func inotifyWatches(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fdinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		b, _ := os.ReadFile("/proc/self/fdinfo/" + fd.Name())
		n += strings.Count(string(b), "inotify wd:")
	}
	return n
}

// A recursive watch of a tree holding a procfs (as "/" does) skips it: inotify
// reports nothing there, and it is thousands of directories to walk and watch.
func TestRecursiveWatchSkipsTheKernelsFilesystems(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a procfs needs root")
	}
	dir := t.TempDir()
	proc := filepath.Join(dir, "proc")
	if err := os.MkdirAll(filepath.Join(dir, "src", "pkg"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(proc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("proc", proc, "proc", 0, ""); err != nil {
		t.Skipf("cannot mount a procfs here: %v", err)
	}
	defer unix.Unmount(proc, unix.MNT_DETACH)

	before := inotifyWatches(t)
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": dir, "recursive": true})
	os.WriteFile(filepath.Join(dir, "src", "pkg", "f"), []byte("x"), 0o644)
	f := c.next(1, 5*time.Second)
	if f.Kind != KindEvent || !strings.Contains(string(f.Payload), `"op":"create"`) {
		t.Fatalf("frame %d %s", f.Kind, f.Payload)
	}
	// dir, src, src/pkg, and dir's parent (for dir's own name)
	if added := inotifyWatches(t) - before; added != 4 {
		t.Fatalf("%d directories watched, want 4", added)
	}
	c.send(1, KindCancel, nil)
	if r := c.wait(1, 5*time.Second); r.resp["ok"] != true {
		t.Fatalf("%v", r.resp)
	}
}
