package agent

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Each job a command leaves running holds two of the agent's fds (its output pipes)
// until it ends: at the kernel's limit for init, about 2,000 of them made every exec fail
// with "pipe2: too many open files". The agent raises its limit when it runs out.
func TestExecsGoOnWhenJobsLeftBehindUseUpTheFileLimit(t *testing.T) {
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	low := syscall.Rlimit{Cur: 96, Max: orig.Max} // the hard one stays: raising it takes a capability
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Skip("cannot lower the open files limit:", err)
	}
	t.Cleanup(func() {
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig)
		raisedOpenFiles.Store(false)
	})
	c := newClient(t, nil)
	for i := 0; i < 60; i++ { // two fds each: 120 > 96
		r := c.call(uint32(i+1), map[string]any{"op": "exec", "cmd": "sleep 5 & echo started"})
		if num(r.resp["exit_code"]) != 0 || string(r.out) != "started\n" {
			t.Fatalf("exec %d: resp %v out %q err %q", i, r.resp, r.out, r.err)
		}
	}
}

// A recursive remove of a tree deeper than the open files limit (os.RemoveAll
// holds an fd per level; a loop of `mkdir d; cd d` makes one) failed with an
// error cut before its cause. The agent raises its limit and goes on.
func TestARemoveOfATreeDeeperThanTheFileLimitSucceeds(t *testing.T) {
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir() + "/deep"
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 300; i++ {
		if err := unix.Mkdirat(fd, "d", 0o755); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(fd, "d", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = next
	}
	unix.Close(fd)
	c := newClient(t, nil) // its own files first: the limit below is for the remove
	low := syscall.Rlimit{Cur: 128, Max: orig.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Skip("cannot lower the open files limit:", err)
	}
	t.Cleanup(func() {
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig)
		raisedOpenFiles.Store(false)
	})
	if r := c.call(1, map[string]any{"op": "remove", "path": root, "recursive": true}); r.resp["ok"] != true {
		t.Fatalf("%v", r.resp)
	}
	if _, err := os.Lstat(root); !os.IsNotExist(err) {
		t.Fatalf("still there: %v", err)
	}
}

// An error text too long for a RESP keeps its start and its end (the cause),
// each cut on a character boundary.
func TestALongErrorKeepsItsCause(t *testing.T) {
	msg := "remove /" + strings.Repeat("é/d", 2000) + ": too many open files"
	got := errResp("io", msg)["error"].(string)
	if len(got) > maxErrorText || !strings.HasPrefix(got, "remove /é") ||
		!strings.HasSuffix(got, "/d: too many open files") || !utf8.ValidString(got) {
		t.Fatalf("%d bytes: %.40q ... %q", len(got), got, got[max(0, len(got)-40):])
	}
}
