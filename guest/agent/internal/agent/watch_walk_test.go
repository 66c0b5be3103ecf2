package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
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

// A recursive watch reads a big directory a batch at a time, as list does: it
// read each whole (and sorted it), ~20 MiB more heap for these 150,000 names
// than for a small tree, at setup and at every overflow's walk. (The live heap,
// sampled right after a GC: the batches' garbage does not count.)
func TestARecursiveWatchDoesNotHoldABigDirectoryInMemory(t *testing.T) {
	small, d := t.TempDir(), t.TempDir()
	big := filepath.Join(d, "big")
	for _, dir := range []string{filepath.Join(small, "sub"), filepath.Join(big, "sub")} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	fd, err := unix.Open(big, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 150_000; i++ { // names of a few files: quicker to make than files
		file := fmt.Sprintf("file%d", i/50_000) // ext4 allows 65,000 links to one
		if i%50_000 == 0 {
			f, err := unix.Openat(fd, file, unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			unix.Close(f)
		}
		if err := unix.Linkat(fd, file, fd, fmt.Sprintf("file-with-a-typical-name-%07d.json", i), 0); err != nil {
			t.Fatal(err)
		}
	}
	unix.Close(fd)
	c := newClient(t, nil)
	// what a watch's setup took of the heap at most
	grew := func(ch uint32, path string) int64 {
		runtime.GC()
		var base runtime.MemStats
		runtime.ReadMemStats(&base)
		var peak atomic.Uint64
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(stopped)
			var m runtime.MemStats
			for { // the live heap: what the GC just left, not garbage it has not reached
				runtime.GC()
				runtime.ReadMemStats(&m)
				peak.Store(max(peak.Load(), m.HeapAlloc))
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()
		c.watch(ch, map[string]any{"path": path, "recursive": true}) // returns once it watches
		close(stop)
		<-stopped
		return int64(peak.Load()) - int64(base.HeapAlloc)
	}
	smallTree, bigTree := grew(1, small), grew(2, d)
	t.Logf("held %d KiB more than a small tree's (%d KiB)", (bigTree-smallTree)>>10, smallTree>>10)
	if bigTree-smallTree > 12<<20 { // 21 MiB on the old code; up to 6 seen on the new

		t.Fatalf("the walk of the big directory held %d KiB of heap more than a small tree's (%d KiB)",
			(bigTree-smallTree)>>10, smallTree>>10)
	}
	os.WriteFile(filepath.Join(big, "sub", "f"), []byte("x"), 0o644)
	if evs := c.fsEvents(2, 300*time.Millisecond); !hasChange(evs, "create", filepath.Join(big, "sub", "f")) {
		t.Fatalf("below the big directory: %v", evs)
	}
}
