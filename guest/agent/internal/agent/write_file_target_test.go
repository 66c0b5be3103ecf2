package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeVia sends one write_file request with data and returns its RESP.
func (c *client) writeVia(ch uint32, req map[string]any, data string) map[string]any {
	c.t.Helper()
	req["op"] = "write_file"
	c.req(ch, req)
	if data != "" {
		c.send(ch, KindIn, []byte(data))
	}
	c.send(ch, KindEOF, nil)
	return c.wait(ch, 5*time.Second).resp
}

func statT(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// A device node is written, not replaced by a regular file, and keeps its
// mode even when the request names one (the host's client always does).
func TestWriteFileWritesDevicesInPlace(t *testing.T) {
	dev := t.TempDir() + "/null"
	if err := syscall.Mknod(dev, syscall.S_IFCHR|0o666, 1<<8|3); err != nil {
		t.Skip(err)
	}
	os.Chmod(dev, 0o666)
	c := newClient(t, nil)
	for i, req := range []map[string]any{{"path": dev}, {"path": dev, "mode": 0o644}, {"path": dev, "append": true}} {
		if r := c.writeVia(uint32(i+1), req, "x\n"); r["ok"] != true || num(r["bytes"]) != 2 {
			t.Fatalf("%v: %v", req, r)
		}
		if st := statT(t, dev); st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Mode&0o7777 != 0o666 || st.Rdev != 1<<8|3 {
			t.Fatalf("%v: the device became mode %o rdev %x", req, st.Mode, st.Rdev)
		}
	}
}

// Writing a symlink writes the file it points to (through a chain, a
// relative link, a link to a link's directory); a dangling link creates its
// target. The links stay links.
func TestWriteFileFollowsSymlinks(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(dir+"/real", 0o755)
	os.WriteFile(dir+"/real/f", []byte("old"), 0o600)
	os.Symlink("real", dir+"/dirlink")
	os.Symlink("../real/f", dir+"/real/rel")     // relative
	os.Symlink(dir+"/dirlink/rel", dir+"/chain") // absolute, through a directory link
	os.Symlink("nothing-yet", dir+"/dangling")
	c := newClient(t, nil)
	for i, p := range []string{dir + "/real/rel", dir + "/chain", dir + "/dirlink/f"} {
		want := fmt.Sprintf("new %d", i)
		if r := c.writeVia(uint32(i+1), map[string]any{"path": p}, want); r["ok"] != true {
			t.Fatalf("%s: %v", p, r)
		}
		if b, _ := os.ReadFile(dir + "/real/f"); string(b) != want {
			t.Fatalf("%s: target holds %q", p, b)
		}
	}
	if fi, _ := os.Stat(dir + "/real/f"); fi.Mode().Perm() != 0o600 {
		t.Fatalf("target mode %v", fi.Mode())
	}
	if r := c.writeVia(9, map[string]any{"path": dir + "/dangling"}, "made"); r["ok"] != true {
		t.Fatalf("dangling: %v", r)
	}
	if b, _ := os.ReadFile(dir + "/nothing-yet"); string(b) != "made" {
		t.Fatalf("dangling link's target holds %q", b)
	}
	for _, l := range []string{"/real/rel", "/chain", "/dirlink", "/dangling"} {
		if fi, err := os.Lstat(dir + l); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatalf("%s is no longer a symlink: %v %v", l, fi.Mode(), err)
		}
	}
	os.Symlink("loop", dir+"/loop")
	r := c.writeVia(10, map[string]any{"path": dir + "/loop"}, "x")
	if r["ok"] != false || !strings.Contains(r["error"].(string), dir+"/loop:") {
		t.Fatalf("loop: %v", r)
	}
	ents, _ := os.ReadDir(dir + "/real")
	if len(ents) != 2 {
		t.Fatalf("left behind in real/: %v", ents)
	}
}

// Rewriting an existing file keeps its owner and, unless the request gives
// a mode, its mode (setuid included); a new file gets 0644 whatever the
// umask, or the mode asked for.
func TestWriteFileKeepsOwnerAndMode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := t.TempDir()
	c := newClient(t, nil)
	script := dir + "/script"
	os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755)
	os.Chown(script, 1000, 1001)
	os.Chmod(script, 0o755|os.ModeSetuid)
	check := func(what, p string, mode, uid, gid uint32, content string) {
		t.Helper()
		st := statT(t, p)
		b, _ := os.ReadFile(p)
		if st.Mode&0o7777 != mode || st.Uid != uid || st.Gid != gid || string(b) != content {
			t.Fatalf("%s: mode %o uid %d gid %d content %q", what, st.Mode&0o7777, st.Uid, st.Gid, b)
		}
	}
	if r := c.writeVia(1, map[string]any{"path": script}, "#!/bin/sh\necho 1\n"); r["ok"] != true {
		t.Fatalf("%v", r)
	}
	check("no mode", script, 0o4755, 1000, 1001, "#!/bin/sh\necho 1\n")
	if r := c.writeVia(2, map[string]any{"path": script, "mode": 0o700}, "2"); r["ok"] != true {
		t.Fatalf("%v", r)
	}
	check("mode 0700", script, 0o700, 1000, 1001, "2")
	c.writeVia(3, map[string]any{"path": dir + "/new"}, "n")
	check("new file", dir+"/new", 0o644, 0, 0, "n")
	c.writeVia(4, map[string]any{"path": dir + "/new2", "mode": 0o640}, "n")
	check("new file, mode 0640", dir+"/new2", 0o640, 0, 0, "n")
	c.writeVia(5, map[string]any{"path": dir + "/new3", "append": true}, "a")
	check("new file by append", dir+"/new3", 0o644, 0, 0, "a")
	c.writeVia(6, map[string]any{"path": script, "append": true, "mode": 0o644}, "+")
	check("append", script, 0o700, 1000, 1001, "2+")
}

// A procfs knob is written where it is: no temporary file beside it, and an
// error names the path the host gave.
func TestWriteFileProcKnob(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := newClient(t, nil)
	knob := fmt.Sprintf("/proc/%d/oom_score_adj", cmd.Process.Pid)
	if r := c.writeVia(1, map[string]any{"path": knob, "mode": 0o644}, "500\n"); r["ok"] != true || num(r["bytes"]) != 4 {
		t.Fatalf("%v", r)
	}
	if b := mustRead(t, knob); string(b) != "500\n" {
		t.Fatalf("oom_score_adj is %q", b)
	}
	// the same through /proc/self, a symlink in the directory part
	if r := c.writeVia(2, map[string]any{"path": "/proc/self/task/../comm", "append": true}, strings.TrimSpace(string(mustRead(t, "/proc/self/comm")))); r["ok"] != true {
		t.Fatalf("/proc/self: %v", r)
	}
	status := fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)
	r := c.writeVia(3, map[string]any{"path": status}, "x")
	if r["ok"] != false || !strings.Contains(r["error"].(string), status+":") || strings.Contains(r["error"].(string), "isorun-") {
		t.Fatalf("read-only knob: %v", r)
	}
}

// A stored file reached through /proc/<pid>/root (a container's file) is
// replaced as any regular file is: a cancelled write leaves it whole, and a
// mode asked for is given. It was written in place, truncated first.
func TestWriteFileThroughProcRootIsReplacedNotTruncated(t *testing.T) {
	p := t.TempDir() + "/config.json"
	old := strings.Repeat("old-content\n", 1000)
	if err := os.WriteFile(p, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	via := "/proc/self/root" + p
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "write_file", "path": via})
	c.send(1, KindIn, []byte("partial"))
	time.Sleep(100 * time.Millisecond)
	c.send(1, KindCancel, nil)
	if r := c.wait(1, 5*time.Second); r.resp["ok"] != false {
		t.Fatalf("cancelled: %v", r.resp)
	}
	if b := mustRead(t, p); string(b) != old {
		t.Fatalf("a cancelled write left %d bytes: %.20q", len(b), b)
	}
	if r := c.writeVia(2, map[string]any{"path": via, "mode": 0o600}, "new"); r["ok"] != true {
		t.Fatalf("%v", r)
	}
	if st := statT(t, p); string(mustRead(t, p)) != "new" || st.Mode&0o777 != 0o600 {
		t.Fatalf("after a write with mode 0600: %q, mode %o", mustRead(t, p), st.Mode&0o777)
	}
	if ents, _ := os.ReadDir(filepath.Dir(p)); len(ents) != 1 {
		t.Fatalf("left beside it: %v", ents)
	}
	// and what procfs holds is still written where it is: a file through /proc/self/fd
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if r := c.writeVia(3, map[string]any{"path": fmt.Sprintf("/proc/self/fd/%d", f.Fd())}, "fd"); r["ok"] != true {
		t.Fatalf("through /proc/self/fd: %v", r)
	}
	if b := mustRead(t, p); string(b) != "fd" {
		t.Fatalf("through /proc/self/fd: %q", b)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A cgroup2 knob (the guest's /sys/fs/cgroup) is written in place.
func TestWriteFileCgroupKnob(t *testing.T) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	root := ""
	for sc := bufio.NewScanner(f); sc.Scan(); {
		if fs := strings.Fields(sc.Text()); len(fs) > 2 && fs[2] == "cgroup2" {
			root = fs[1]
			break
		}
	}
	if root == "" {
		t.Skip("no cgroup2 mount")
	}
	cg := filepath.Join(root, fmt.Sprintf("isorun-test-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Skip(err)
	}
	defer os.Remove(cg)
	c := newClient(t, nil)
	if r := c.writeVia(1, map[string]any{"path": cg + "/cgroup.max.depth", "mode": 0o644}, "3\n"); r["ok"] != true {
		t.Fatalf("%v", r)
	}
	if b := mustRead(t, cg+"/cgroup.max.depth"); string(b) != "3\n" {
		t.Fatalf("cgroup.max.depth is %q", b)
	}
}

// A FIFO is written, not replaced: to its reader if there is one, an
// "invalid" error naming it if not; a write its reader does not take can be
// cancelled.
func TestWriteFileFIFO(t *testing.T) {
	p := t.TempDir() + "/fifo"
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	r := c.writeVia(1, map[string]any{"path": p}, "x")
	if r["code"] != "invalid" || !strings.Contains(r["error"].(string), p+" is a FIFO") {
		t.Fatalf("no reader: %v", r)
	}
	got := make(chan string, 1)
	go func() {
		rf, err := os.Open(p) // blocks until the agent opens its end
		if err != nil {
			got <- err.Error()
			return
		}
		b, _ := io.ReadAll(rf)
		rf.Close()
		got <- string(b)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for i := uint32(2); ; i++ { // until the reader's open(2) is in
		r = c.writeVia(i, map[string]any{"path": p}, "through the pipe")
		if r["ok"] == true || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r["ok"] != true || <-got != "through the pipe" {
		t.Fatalf("%v", r)
	}
	if fi, _ := os.Lstat(p); fi.Mode()&os.ModeNamedPipe == 0 {
		t.Fatalf("the FIFO became %v", fi.Mode())
	}
	// a reader that never reads: the write blocks once the pipe is full
	rf, err := os.OpenFile(p, os.O_RDWR, 0) // O_RDWR: a reader without blocking
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	c.req(100, map[string]any{"op": "write_file", "path": p})
	chunk := strings.Repeat("z", 60000)
	for i := 0; i < 4; i++ { // 240000 bytes: more than the pipe and one IN window
		c.send(100, KindIn, []byte(chunk))
	}
	time.Sleep(200 * time.Millisecond)
	c.send(100, KindCancel, nil)
	if r := c.wait(100, 5*time.Second); r.resp["ok"] != false || r.resp["error"] != "cancelled" {
		t.Fatalf("cancel of a blocked write: %v", r.resp)
	}
}

// Names up to NAME_MAX can be written and replaced: the file written first,
// beside the target, has a name of its own that fits.
func TestWriteFileLongestName(t *testing.T) {
	p := filepath.Join(t.TempDir(), strings.Repeat("n", 255))
	c := newClient(t, nil)
	for i, data := range []string{"first\n", "second\n"} {
		if r := c.writeVia(uint32(i+1), map[string]any{"path": p}, data); r["ok"] != true {
			t.Fatalf("write %d: %v", i, r)
		}
		if got, _ := os.ReadFile(p); string(got) != data {
			t.Fatalf("write %d: file holds %q", i, got)
		}
	}
	if left, _ := filepath.Glob(filepath.Dir(p) + "/.*"); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// A path through /proc/<pid>/root (into a container in the guest) writes the
// file it names, as a read of it reads: the directory was resolved from the
// link's text ("/"), and the agent's own file at the same path overwritten.
func TestWriteThroughAProcessRootWritesItsFile(t *testing.T) {
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare")
	}
	dir := t.TempDir()
	ours := dir + "/f"
	if err := os.WriteFile(ours, []byte("ours"), 0o644); err != nil {
		t.Fatal(err)
	}
	// a process with a mount namespace of its own, where dir is another tmpfs
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		"mount -t tmpfs none "+dir+" && echo theirs > "+ours+" && touch "+dir+"/ready && exec sleep 30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	theirs := "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/root" + ours
	for i := 0; ; i++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/root" + dir + "/ready"); err == nil {
			break
		} else if i == 500 {
			t.Skipf("no mount namespace here: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := newClient(t, nil)
	if resp := c.writeVia(1, map[string]any{"path": theirs}, "written"); resp["ok"] != true {
		t.Fatalf("%v", resp)
	}
	got, _ := os.ReadFile(theirs)
	mine, _ := os.ReadFile(ours)
	if string(got) != "written" || string(mine) != "ours" {
		t.Fatalf("theirs %q, ours %q", got, mine)
	}
}

// A relative link met under /proc/<pid>/cwd is followed from where the kernel
// finds it, not from the text of the path (which ".." would cut across).
func TestWriteThroughAProcessCwdAndARelativeLink(t *testing.T) {
	d := t.TempDir()
	if err := os.MkdirAll(d+"/a", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d+"/t", []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../t", d+"/a/l"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	cmd.Dir = d + "/a"
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	c := newClient(t, nil)
	p := "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cwd/l"
	if resp := c.writeVia(1, map[string]any{"path": p}, "new"); resp["ok"] != true {
		t.Fatalf("%v", resp)
	}
	if b, _ := os.ReadFile(d + "/t"); string(b) != "new" {
		t.Fatalf("the link's target holds %q", b)
	}
}

// A link whose text has ".." after another link: the kernel takes ".." from
// the inner link's target; write_file took it as text and wrote a file other
// than the one a read of the same path reads.
func TestWriteThroughALinkWithDotDotAfterALinkIsTheKernels(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.MkdirAll(dir+"/other/deep", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("other/deep", dir+"/sub"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("sub/../f", dir+"/l"); err != nil { // the kernel: other/f
		t.Fatal(err)
	}
	c.writeVia(1, map[string]any{"path": dir + "/l"}, "new")
	if b, err := os.ReadFile(dir + "/other/f"); err != nil || string(b) != "new" {
		t.Fatalf("other/f: %q %v", b, err)
	}
	if _, err := os.Lstat(dir + "/f"); !os.IsNotExist(err) {
		t.Fatalf("wrote %s/f instead: %v", dir, err)
	}
	if r := c.call(2, map[string]any{"op": "read_file", "path": dir + "/l"}); string(r.out) != "new" {
		t.Fatalf("read back %q %v", r.out, r.resp)
	}
}
