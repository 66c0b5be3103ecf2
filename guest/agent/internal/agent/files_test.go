package agent

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestFiles(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	p := filepath.Join(dir, "a", "b.txt")
	big := strings.Repeat("0123456789abcdef", 40000) // 640000 bytes: > one window
	c.req(1, map[string]any{"op": "write_file", "path": p, "mode": 0o600})
	owed := 0 // honour the agent's IN window
	for i := 0; i < len(big); i += 60000 {
		chunk := big[i:min(i+60000, len(big))]
		for owed+len(chunk) > initialWindow {
			if f := c.next(1, 5*time.Second); f.Kind == KindCredit {
				owed -= int(binary.BigEndian.Uint32(f.Payload))
			}
		}
		c.send(1, KindIn, []byte(chunk))
		owed += len(chunk)
	}
	c.send(1, KindEOF, nil)
	r := c.wait(1, 10*time.Second)
	if r.resp["ok"] != true || num(r.resp["bytes"]) != int64(len(big)) {
		t.Fatalf("write: %v", r.resp)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stat: %v %v", fi, err)
	}
	r = c.call(2, map[string]any{"op": "read_file", "path": p})
	if string(r.out) != big || num(r.resp["bytes"]) != int64(len(big)) || num(r.events[0]["size"]) != int64(len(big)) || num(r.events[0]["mode"]) != 0o600 {
		t.Fatalf("read: %d bytes, %v %v", len(r.out), r.resp, r.events)
	}
	r = c.call(3, map[string]any{"op": "read_file", "path": p, "offset": 10, "length": 6})
	if string(r.out) != "abcdef" {
		t.Fatalf("ranged read %q", r.out)
	}
	c.req(4, map[string]any{"op": "write_file", "path": p, "append": true})
	c.send(4, KindIn, []byte("END"))
	c.send(4, KindEOF, nil)
	if r = c.wait(4, 5*time.Second); num(r.resp["bytes"]) != 3 {
		t.Fatalf("append %v", r.resp)
	}
	r = c.call(5, map[string]any{"op": "stat", "path": p})
	e := r.resp["entry"].(map[string]any)
	if e["type"] != "file" || num(e["size"]) != int64(len(big)+3) || e["name"] != "b.txt" {
		t.Fatalf("stat %v", r.resp)
	}
	if r = c.call(6, map[string]any{"op": "mkdir", "path": dir + "/x/y"}); r.resp["ok"] != true {
		t.Fatalf("mkdir %v", r.resp)
	}
	if r = c.call(7, map[string]any{"op": "mkdir", "path": dir + "/x", "parents": false}); r.resp["code"] != "exists" {
		t.Fatalf("mkdir exists %v", r.resp)
	}
	os.Symlink("a", dir+"/link")
	r = c.call(8, map[string]any{"op": "list", "path": dir, "depth": 3})
	names := map[string]string{}
	for _, ev := range r.events {
		for _, it := range ev["entries"].([]any) {
			m := it.(map[string]any)
			names[strings.TrimPrefix(m["path"].(string), dir)] = m["type"].(string)
		}
	}
	if num(r.resp["count"]) != 5 || names["/a/b.txt"] != "file" || names["/link"] != "symlink" || names["/x/y"] != "dir" {
		t.Fatalf("list %v %v", r.resp, names)
	}
	if r = c.call(9, map[string]any{"op": "rename", "src": p, "dst": dir + "/c.txt"}); r.resp["ok"] != true {
		t.Fatalf("rename %v", r.resp)
	}
	if r = c.call(10, map[string]any{"op": "remove", "path": dir + "/x"}); r.resp["code"] != "not_empty" {
		t.Fatalf("remove non-empty %v", r.resp)
	}
	if r = c.call(11, map[string]any{"op": "remove", "path": dir + "/x", "recursive": true}); r.resp["ok"] != true {
		t.Fatalf("remove %v", r.resp)
	}
	for i, req := range []map[string]any{
		{"op": "read_file", "path": dir + "/nope"},
		{"op": "stat", "path": dir + "/nope"},
		{"op": "remove", "path": dir + "/nope"},
	} {
		if r = c.call(uint32(20+i), req); r.resp["code"] != "not_found" {
			t.Fatalf("%v: %v", req, r.resp)
		}
	}
	if r = c.call(30, map[string]any{"op": "read_file", "path": dir}); r.resp["code"] != "is_dir" {
		t.Fatalf("%v", r.resp)
	}
	for i, bad := range []string{"", "a\x00b"} {
		if r = c.call(uint32(31+i), map[string]any{"op": "stat", "path": bad}); r.resp["code"] != "invalid" {
			t.Fatalf("%q: %v", bad, r.resp)
		}
	}
}

// A relative path is taken from the working directory a command runs in, for
// files and for an exec's own cwd alike (a file written as "notes.txt" is the
// one `cat notes.txt` reads).
func TestRelativePathsAreFromTheWorkingDirectory(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if r := c.call(1, map[string]any{"op": "stat", "path": "."}); r.resp["entry"].(map[string]any)["path"] != "/" {
		t.Fatalf("no working directory set: %v", r.resp)
	}
	c.call(2, map[string]any{"op": "set_defaults", "cwd": dir})
	c.req(3, map[string]any{"op": "write_file", "path": "notes.txt"})
	c.send(3, KindIn, []byte("hi"))
	c.send(3, KindEOF, nil)
	if r := c.wait(3, 5*time.Second); r.resp["ok"] != true {
		t.Fatalf("write: %v", r.resp)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "notes.txt")); string(b) != "hi" {
		t.Fatalf("%q %v", b, err)
	}
	if r := c.call(4, map[string]any{"op": "exec", "cmd": "cat notes.txt"}); string(r.out) != "hi" {
		t.Fatalf("exec read %q %q", r.out, r.err)
	}
	if r := c.call(5, map[string]any{"op": "mkdir", "path": "sub/deeper"}); r.resp["ok"] != true {
		t.Fatalf("mkdir: %v", r.resp)
	}
	if r := c.call(6, map[string]any{"op": "rename", "src": "notes.txt", "dst": "sub/n.txt"}); r.resp["ok"] != true {
		t.Fatalf("rename: %v", r.resp)
	}
	if r := c.call(7, map[string]any{"op": "exec", "cmd": "pwd; cat n.txt", "cwd": "sub"}); string(r.out) != filepath.Join(dir, "sub")+"\nhi" {
		t.Fatalf("exec in a relative cwd: %q %q", r.out, r.err)
	}
	r := c.call(8, map[string]any{"op": "stat", "path": "sub/../sub/n.txt"})
	if e := r.resp["entry"].(map[string]any); e["path"] != filepath.Join(dir, "sub", "n.txt") {
		t.Fatalf("stat: %v", r.resp)
	}
}

// ".." after a symlink is the parent of the link's target, as for the
// kernel: read_file, write_file and stat name the file `cat` reads, for an
// absolute path and for one relative to a working directory through a link.
func TestDotDotAfterASymlinkIsTheKernels(t *testing.T) {
	c := newClient(t, nil)
	d := t.TempDir()
	os.MkdirAll(d+"/real/sub", 0o755)
	os.Symlink("real/sub", d+"/link")
	os.WriteFile(d+"/real/f", []byte("kernel's f\n"), 0o644)
	os.WriteFile(d+"/f", []byte("lexical f\n"), 0o644)
	p := d + "/link/../f"
	if r := c.call(1, map[string]any{"op": "exec", "argv": []string{"cat", p}}); string(r.out) != "kernel's f\n" {
		t.Fatalf("cat %s: %q %q", p, r.out, r.err)
	}
	if r := c.call(2, map[string]any{"op": "read_file", "path": p}); string(r.out) != "kernel's f\n" {
		t.Fatalf("read_file %s: %q %v", p, r.out, r.resp)
	}
	r := c.call(3, map[string]any{"op": "stat", "path": p})
	if e, _ := r.resp["entry"].(map[string]any); e == nil || e["path"] != d+"/real/f" {
		t.Fatalf("stat %s: %v", p, r.resp)
	}
	c.call(4, map[string]any{"op": "set_defaults", "cwd": d + "/link"})
	if r := c.writeVia(5, map[string]any{"path": "../f"}, "new\n"); r["ok"] != true {
		t.Fatalf("write_file ../f from %s/link: %v", d, r)
	}
	if a, b := mustRead(t, d+"/real/f"), mustRead(t, d+"/f"); string(a) != "new\n" || string(b) != "lexical f\n" {
		t.Fatalf("after write_file ../f: real/f %q, f %q", a, b)
	}
	// and as for the kernel, ".." after a file is no directory's parent
	if r := c.call(6, map[string]any{"op": "read_file", "path": d + "/f/../f"}); r.resp["code"] != "not_dir" {
		t.Fatalf("read_file f/../f: %v", r.resp)
	}
}

// A cancelled write leaves the old file intact and no temporary behind.
func TestWriteFileCancel(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	p := dir + "/f"
	os.WriteFile(p, []byte("old"), 0o644)
	c.req(1, map[string]any{"op": "write_file", "path": p})
	c.send(1, KindIn, []byte("new data"))
	time.Sleep(50 * time.Millisecond)
	c.send(1, KindCancel, nil)
	r := c.wait(1, 5*time.Second)
	b, _ := os.ReadFile(p)
	ents, _ := os.ReadDir(dir)
	if r.resp["ok"] != false || string(b) != "old" || len(ents) != 1 {
		t.Fatalf("resp %v, content %q, %d entries", r.resp, b, len(ents))
	}
}

func TestWatch(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	c.watch(1, map[string]any{"path": dir, "recursive": true})
	os.WriteFile(dir+"/new", []byte("x"), 0o644)
	f := c.next(1, 5*time.Second)
	if f.Kind != KindEvent || !strings.Contains(string(f.Payload), `"op":"create"`) {
		t.Fatalf("frame %d %s", f.Kind, f.Payload)
	}
	c.send(1, KindCancel, nil)
	if r := c.wait(1, 5*time.Second); r.resp["ok"] != true {
		t.Fatalf("%v", r.resp)
	}
}

// A CANCEL that arrives while a recursive list is inside a subdirectory ends
// the listing with "cancelled", as at the top level.
func TestListCancelInsideTheTree(t *testing.T) {
	dir := t.TempDir()
	long := strings.Repeat("n", 200) // ~50 entries per EVENT batch
	for d := 0; d < 8; d++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%d", d))
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 100; i++ {
			if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("%s%03d", long, i)), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A bare connection whose "writer" cancels after the first batch: the
	// second batch is taken only once the cancel is in.
	c := &Conn{out: make(chan outFrame), done: make(chan struct{}), chans: map[uint32]*Channel{}}
	defer close(c.done)
	ch := newChannel(c, 1)
	go func() {
		<-c.out
		close(ch.cancel)
		for {
			select {
			case <-c.out:
			case <-c.done:
				return
			}
		}
	}()
	f, err := openListed(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	err = (&lister{ch: ch}).walk(f, dir, 2)
	if ae, ok := err.(*apiError); !ok || ae.Code != "io" || ae.Msg != "cancelled" {
		t.Fatalf("walk after CANCEL returned %v", err)
	}
}

// A FIFO planted where the host reads or appends (a guest process can do it)
// gets a clear error at once instead of a request blocked in open(2) forever.
func TestFileOpsRefuseFIFOs(t *testing.T) {
	c := newClient(t, nil)
	p := t.TempDir() + "/fifo"
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	c.req(1, map[string]any{"op": "read_file", "path": p})
	if r := c.wait(1, 3*time.Second); r.resp["code"] != "invalid" || !strings.Contains(r.resp["error"].(string), "FIFO") {
		t.Fatalf("read_file: %v", r.resp)
	}
	c.req(2, map[string]any{"op": "write_file", "path": p, "append": true})
	c.send(2, KindEOF, nil)
	if r := c.wait(2, 3*time.Second); r.resp["code"] != "invalid" || !strings.Contains(r.resp["error"].(string), "FIFO") {
		t.Fatalf("append: %v", r.resp)
	}
}

// mkdir gives a new directory the requested mode whatever the umask (as
// write_file does for files), and leaves an existing one alone.
func TestMkdirModeIgnoresTheUmask(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	c := newClient(t, nil)
	dir := t.TempDir()
	for i, parents := range []bool{true, false} {
		p := fmt.Sprintf("%s/shared%d", dir, i)
		if r := c.call(uint32(i+1), map[string]any{"op": "mkdir", "path": p, "mode": 0o777, "parents": parents}); r.resp["ok"] != true {
			t.Fatalf("mkdir %v", r.resp)
		}
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o777 {
			t.Fatalf("parents=%v: %v %v", parents, fi.Mode(), err)
		}
	}
	os.Chmod(dir+"/shared0", 0o700)
	c.call(9, map[string]any{"op": "mkdir", "path": dir + "/shared0", "mode": 0o777})
	if fi, _ := os.Stat(dir + "/shared0"); fi.Mode().Perm() != 0o700 {
		t.Fatalf("an existing directory's mode changed: %v", fi.Mode())
	}
}

// rename is rename(2): a directory replaces an empty one (os.Rename refuses
// that), not a full one; across filesystems the error says so.
func TestRenameIsRename2(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{dir + "/src/sub", dir + "/empty", dir + "/full/x"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c := newClient(t, nil)
	if r := c.call(1, map[string]any{"op": "rename", "src": dir + "/src", "dst": dir + "/empty"}); r.resp["ok"] != true {
		t.Fatalf("onto an empty directory: %v", r.resp)
	}
	if _, err := os.Stat(dir + "/empty/sub"); err != nil {
		t.Fatal(err)
	}
	r := c.call(2, map[string]any{"op": "rename", "src": dir + "/empty", "dst": dir + "/full"})
	if r.resp["code"] != "not_empty" || !strings.Contains(fmt.Sprint(r.resp["error"]), dir+"/full") {
		t.Fatalf("onto a full directory: %v", r.resp)
	}
	var st, shm unix.Statfs_t
	if unix.Statfs(dir, &st) != nil || unix.Statfs("/dev/shm", &shm) != nil || st.Fsid == shm.Fsid {
		t.Skip("no second filesystem at /dev/shm")
	}
	other, err := os.MkdirTemp("/dev/shm", "rename")
	if err != nil {
		t.Skip(err)
	}
	defer os.RemoveAll(other)
	r = c.call(3, map[string]any{"op": "rename", "src": dir + "/full", "dst": other + "/full"})
	if r.resp["code"] != "cross_device" || !strings.Contains(fmt.Sprint(r.resp["error"]), "different filesystems") {
		t.Fatalf("across filesystems: %v", r.resp)
	}
}

// A trailing slash names a directory, as for the kernel: a file is not
// reached through "f/", and a write to "d/" is refused rather than creating
// a file d.
func TestTrailingSlashNamesADirectory(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/f", []byte("x"), 0o644)
	c := newClient(t, nil)
	for i, op := range []string{"stat", "read_file", "remove"} {
		if r := c.call(uint32(i+1), map[string]any{"op": op, "path": dir + "/f/"}); r.resp["code"] != "not_dir" {
			t.Fatalf("%s f/: %v", op, r.resp)
		}
	}
	if r := c.writeVia(5, map[string]any{"path": dir + "/new/"}, "x"); r["code"] != "is_dir" {
		t.Fatalf("write_file new/: %v", r)
	}
	if _, err := os.Stat(dir + "/new"); !os.IsNotExist(err) {
		t.Fatalf("write_file new/ made %s/new: %v", dir, err)
	}
	r := c.call(6, map[string]any{"op": "stat", "path": dir + "/"})
	if r.resp["ok"] != true || r.resp["entry"].(map[string]any)["type"] != "dir" {
		t.Fatalf("stat dir/: %v", r.resp)
	}
	r = c.call(7, map[string]any{"op": "list", "path": dir + "/"})
	if r.resp["ok"] != true || !strings.Contains(fmt.Sprint(r.events), "path:"+dir+"/f ") {
		t.Fatalf("list dir/: %v %v", r.resp, r.events)
	}
}

// A link whose text ends in "/" names a directory, as open(2) takes it:
// write_file through a dangling "l -> missing/" is refused (EISDIR) rather
// than creating a file "missing", and through "l -> f/" to a file, ENOTDIR.
func TestWriteThroughALinkWithASlashNamesADirectory(t *testing.T) {
	d := t.TempDir()
	os.WriteFile(d+"/f", []byte("old"), 0o644)
	os.Symlink("missing/", d+"/l")
	os.Symlink("f/", d+"/lf")
	os.Symlink("l", d+"/ll") // the slash holds through another link
	c := newClient(t, nil)
	for i, tc := range []struct{ link, code string }{{"l", "is_dir"}, {"ll", "is_dir"}, {"lf", "not_dir"}} {
		r := c.writeVia(uint32(i+1), map[string]any{"path": d + "/" + tc.link}, "x")
		if msg, _ := r["error"].(string); r["code"] != tc.code || !strings.Contains(msg, d+"/"+tc.link) {
			t.Fatalf("write_file %s: %v", tc.link, r)
		}
	}
	if _, err := os.Lstat(d + "/missing"); !os.IsNotExist(err) {
		t.Fatalf("write_file through l -> missing/ made %s/missing: %v", d, err)
	}
	if b, _ := os.ReadFile(d + "/f"); string(b) != "old" {
		t.Fatalf("f holds %q", b)
	}
}

// remove of "link/" where link leads to a directory is refused, saying what
// to remove instead: it named the directory, yet os.RemoveAll would unlink the
// link and keep the entries (rm -rf empties the directory, then fails).
func TestRemoveOfALinkToADirectoryWithASlashIsRefused(t *testing.T) {
	d := t.TempDir()
	os.MkdirAll(d+"/real/sub", 0o755)
	os.WriteFile(d+"/real/sub/f", []byte("x"), 0o644)
	os.Symlink("real", d+"/ldir")
	c := newClient(t, nil)
	for i, recursive := range []bool{true, false} {
		r := c.call(uint32(i+1), map[string]any{"op": "remove", "path": d + "/ldir/", "recursive": recursive})
		msg, _ := r.resp["error"].(string)
		if r.resp["code"] != "invalid" || !strings.Contains(msg, d+"/ldir/") || !strings.Contains(msg, `"`+d+`/ldir"`) {
			t.Fatalf("remove ldir/ (recursive %v): %v", recursive, r.resp)
		}
		if _, err := os.Lstat(d + "/ldir"); err != nil {
			t.Fatalf("the link is gone: %v", err)
		}
		if _, err := os.Stat(d + "/real/sub/f"); err != nil {
			t.Fatalf("the directory's entries are gone: %v", err)
		}
	}
	if r := c.call(3, map[string]any{"op": "remove", "path": d + "/ldir", "recursive": true}); r.resp["ok"] != true {
		t.Fatalf("remove ldir: %v", r.resp)
	}
	if _, err := os.Stat(d + "/real/sub/f"); err != nil {
		t.Fatalf("removing the link removed what it leads to: %v", err)
	}
}

// An append that creates its file and is cut short leaves a file with the
// mode asked for (default 0644), not the 0600 it was created with.
func TestAnAppendCutShortLeavesItsFileWithItsMode(t *testing.T) {
	c := newClient(t, nil)
	p := t.TempDir() + "/new.log"
	c.req(1, map[string]any{"op": "write_file", "path": p, "append": true})
	c.send(1, KindIn, []byte("partial"))
	time.Sleep(100 * time.Millisecond)
	c.send(1, KindCancel, nil)
	if r := c.wait(1, 5*time.Second); r.resp["ok"] != false {
		t.Fatalf("%v", r.resp)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("%v %v", fi.Mode(), err)
	}
}

// A device of records (/dev/kmsg) is read a record at a time to its end: it
// failed EINVAL once a frame's space left was under the next record, and a
// non-blocking read past the last said EAGAIN.
func TestReadOfARecordDeviceEndsCleanly(t *testing.T) {
	if f, err := os.Open("/dev/kmsg"); err != nil {
		t.Skipf("no readable /dev/kmsg: %v", err)
	} else {
		f.Close()
	}
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "read_file", "path": "/dev/kmsg"})
	if r.resp["ok"] != true || !bytes.Contains(r.out, []byte(";")) {
		t.Fatalf("%d bytes, resp %v", len(r.out), r.resp)
	}
}

// A device of records (/dev/kmsg refuses a buffer shorter than its next
// record, EINVAL) is read a whole record at a time: `length` sends the first
// bytes of the log, and a credit window shorter than a record is waited out.
func TestReadOfARecordDeviceSendsWhatFits(t *testing.T) {
	if f, err := os.Open("/dev/kmsg"); err != nil {
		t.Skipf("no readable /dev/kmsg: %v", err)
	} else {
		f.Close()
	}
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "read_file", "path": "/dev/kmsg", "length": 40})
	if r.resp["ok"] != true || len(r.out) != 40 || num(r.resp["bytes"]) != 40 {
		t.Fatalf("length 40: %d bytes, resp %v", len(r.out), r.resp)
	}
	// a channel with 10 bytes of window, on a connection whose frames are dropped
	conn := &Conn{out: make(chan outFrame, 64), done: make(chan struct{}), chans: map[uint32]*Channel{}}
	defer conn.close()
	go func() {
		for {
			select {
			case f := <-conn.out:
				if f.pooled != nil {
					framePool.Put(f.pooled)
				}
			case <-conn.done:
				return
			}
		}
	}()
	ch := newChannel(conn, 1)
	ch.window = 10
	type answer struct {
		resp any
		err  error
	}
	done := make(chan answer, 1)
	go func() {
		resp, err := opReadFile(c.srv, ch, []byte(`{"op":"read_file","path":"/dev/kmsg"}`))
		done <- answer{resp, err}
	}()
	select {
	case a := <-done:
		t.Fatalf("with a 10-byte window: %v %v", a.resp, a.err)
	case <-time.After(200 * time.Millisecond):
	}
	ch.addCredit(1 << 30)
	select {
	case a := <-done:
		if a.err != nil {
			t.Fatalf("after the credit: %v", a.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no answer after the credit")
	}
}

// A date past 2262 is held at int64's end, not wrapped to 1915.
func TestStatOfAFarFutureMtime(t *testing.T) {
	p := t.TempDir() + "/f"
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// not os.Chtimes: it goes through UnixNano, and would set 1915
	far := syscall.Timespec{Sec: time.Date(2500, 1, 1, 0, 0, 0, 0, time.UTC).Unix()}
	if err := syscall.UtimesNano(p, []syscall.Timespec{far, far}); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "stat", "path": p})
	if e, _ := r.resp["entry"].(map[string]any); e == nil || e["mtime_ns"].(float64) < 9e18 {
		t.Fatalf("%v", r.resp)
	}
}

// A file mounted on (a container's /etc/hosts) is written where it is:
// replacing it by rename failed EBUSY.
func TestWriteToABindMountedFile(t *testing.T) {
	dir := t.TempDir()
	src, dst := dir+"/src", dir+"/dst"
	for _, p := range []string{src, dst} {
		if err := os.WriteFile(p, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount(src, dst, "", syscall.MS_BIND, ""); err != nil {
		t.Skipf("bind mount: %v", err)
	}
	defer syscall.Unmount(dst, syscall.MNT_DETACH)
	c := newClient(t, nil)
	if resp := c.writeVia(1, map[string]any{"path": dst}, "new"); resp["ok"] != true {
		t.Fatalf("%v", resp)
	}
	if b, _ := os.ReadFile(src); string(b) != "new" {
		t.Fatalf("the mounted file holds %q", b)
	}
}

// A listing does not hold a whole directory: 100,000 names took ~16 MiB of
// the guest's memory before the first entry went out (a million, ~160 MiB of
// a 512 MiB guest). It reads them a batch at a time.
func TestListOfAHugeDirectoryHoldsABatchAtATime(t *testing.T) {
	dir := t.TempDir()
	for i := 0; i < 100000; i++ {
		f, err := os.Create(fmt.Sprintf("%s/file-with-a-typical-name-%07d.json", dir, i))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base, peak := ms.HeapAlloc, ms.HeapAlloc
	stop, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			// what is held, not garbage: HeapAlloc counts that too until a collection,
			// and a heap made big by earlier tests collects late
			runtime.GC()
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapAlloc)
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	c := newClient(t, nil)
	c.req(1, map[string]any{"op": "list", "path": dir})
	if f := c.next(1, 60*time.Second); f.Kind != KindEvent {
		t.Fatalf("first frame %d %s", f.Kind, f.Payload)
	}
	c.send(1, KindCancel, nil)
	c.wait(1, 60*time.Second)
	close(stop)
	<-sampled
	t.Logf("the heap grew %d KiB before the first entries went out", (peak-base)>>10)
	if grew := (peak - base) >> 20; grew > 6 {
		t.Fatalf("the heap grew %d MiB before the first entries went out", grew)
	}
}

// mkdir -p of "file/" where file is a file (or a link to one) fails as
// `mkdir -p` does: it answered ok, making nothing.
func TestMkdirOfAFileWithASlashIsRefused(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/file", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("file", dir+"/link"); err != nil {
		t.Fatal(err)
	}
	for i, p := range []string{dir + "/file/", dir + "/link/"} {
		r := c.call(uint32(i+1), map[string]any{"op": "mkdir", "path": p})
		if r.resp["ok"] == true || r.resp["code"] != "not_dir" {
			t.Errorf("mkdir %s: %v, want not_dir", p, r.resp)
		}
	}
	if b, err := os.ReadFile(dir + "/file"); err != nil || string(b) != "x" {
		t.Fatalf("file changed: %q %v", b, err)
	}
}

// "x/." names x as a directory, as "x/" does: a read of a file through it
// fails not_dir, a stat through a link to a directory is the directory's, and
// a remove of it is refused as for "x/" (it removed the link).
func TestATrailingDotNamesADirectory(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/file", []byte("secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir+"/d", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("d", dir+"/ld"); err != nil {
		t.Fatal(err)
	}
	r := c.call(1, map[string]any{"op": "read_file", "path": dir + "/file/."})
	if r.resp["code"] != "not_dir" || len(r.out) != 0 {
		t.Errorf("read_file file/.: %v %q, want not_dir", r.resp, r.out)
	}
	r = c.call(2, map[string]any{"op": "stat", "path": dir + "/ld/."})
	if e, _ := r.resp["entry"].(map[string]any); e == nil || e["type"] != "dir" {
		t.Errorf("stat ld/.: %v, want the directory's", r.resp)
	}
	slash := c.call(3, map[string]any{"op": "remove", "path": dir + "/ld/", "recursive": true})
	dot := c.call(4, map[string]any{"op": "remove", "path": dir + "/ld/.", "recursive": true})
	if dot.resp["ok"] == true || dot.resp["code"] != slash.resp["code"] {
		t.Errorf("remove ld/.: %v; remove ld/: %v", dot.resp, slash.resp)
	}
	if _, err := os.Lstat(dir + "/ld"); err != nil {
		t.Fatalf("the link is gone: %v", err)
	}
}

// TestReadOfAFreeTerminalLeavesTheAgentWithoutOne runs its helper as a
// session leader without a controlling terminal, as the agent (PID 1) is.
func TestReadOfAFreeTerminalLeavesTheAgentWithoutOne(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperReadsAFreeTerminal$")
	cmd.Env = append(os.Environ(), "ISORUN_CTTY_HELPER=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "tty_nr 0\n") {
		t.Fatalf("%v: %s", err, out)
	}
}

// TestHelperReadsAFreeTerminal is the child of
// TestReadOfAFreeTerminalLeavesTheAgentWithoutOne: a read_file of a terminal
// no session holds made it the agent's controlling terminal, so every later
// command outside a PTY had it as /dev/tty (a password prompt waited on it).
func TestHelperReadsAFreeTerminal(t *testing.T) {
	if os.Getenv("ISORUN_CTTY_HELPER") != "1" {
		t.Skip("run by TestReadOfAFreeTerminalLeavesTheAgentWithoutOne")
	}
	c := newClient(t, nil)
	master, slave, err := openPTY()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	name := slave.Name()
	slave.Close()
	c.call(1, map[string]any{"op": "read_file", "path": name})
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	s := string(stat)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:]) // state ppid pgrp session tty_nr
	fmt.Printf("tty_nr %s\n", fields[4])
}

// A guest process swapping a listed subdirectory with a FIFO (or a symlink)
// between the listing's stat and its open: the open waited for a writer for
// good, past any CANCEL. Now each listing answers.
func TestAListingAnswersWhileADirectoryIsSwappedWithAFIFO(t *testing.T) {
	d := t.TempDir()
	sub, fifo := filepath.Join(d, "sub"), filepath.Join(d, "fifo")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	swapped := make(chan struct{})
	go func() { // the hostile guest process
		defer close(swapped)
		for {
			select {
			case <-stop:
				return
			default:
				_ = unix.Renameat2(unix.AT_FDCWD, sub, unix.AT_FDCWD, fifo, unix.RENAME_EXCHANGE)
			}
		}
	}()
	defer func() {
		close(stop)
		<-swapped
		for _, p := range []string{sub, fifo} { // frees an open(2) that waits, if any
			if f, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				f.Close()
			}
		}
	}()
	c := newClient(t, nil)
	for i := uint32(1); i <= 300; i++ {
		c.req(i, map[string]any{"op": "list", "path": d, "depth": 2})
		if r := c.wait(i, 5*time.Second); r.resp["ok"] != true {
			t.Fatalf("list %d: %v", i, r.resp)
		}
	}
}

// An account file that is no regular file (guest root made /etc/passwd a
// FIFO) is an error at once: its open waited for a writer, and with it every
// exec, write_file and mkdir for a user.
func TestAnAccountFileThatIsAFIFOIsAnError(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "passwd")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- scanColon(fifo, func([]string) bool { return true }) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), fifo+" is not a regular file") {
			t.Fatalf("scanColon of a FIFO: %v", err)
		}
	case <-time.After(3 * time.Second):
		w, _ := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		w.Close()
		t.Fatal("scanColon of a FIFO waited for a writer")
	}
}

// A tree whose paths pass PATH_MAX (4096 bytes) is listed whole: an entry's
// lstat by path failed ENAMETOOLONG and was taken for one gone meanwhile, so
// the listing answered ok without the deepest entries, and a link's text.
func TestAListingGoesPastPathMax(t *testing.T) {
	d := t.TempDir()
	name := strings.Repeat("n", 250)
	fd, err := unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	const levels = 20 // 20 * 251 bytes > 4096
	for i := 0; i < levels; i++ {
		if err := unix.Mkdirat(fd, name, 0o755); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = next
	}
	err = unix.Symlinkat("../target", fd, "l")
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "list", "path": d, "depth": levels + 1})
	var paths []string
	link := ""
	for _, ev := range r.events {
		for _, e := range ev["entries"].([]any) {
			m := e.(map[string]any)
			paths = append(paths, m["path"].(string))
			if m["type"] == "symlink" {
				link, _ = m["link"].(string)
			}
		}
	}
	if r.resp["ok"] != true || len(paths) != levels+1 || num(r.resp["count"]) != levels+1 || link != "../target" {
		t.Fatalf("resp %v: %d entries of %d, link %q", r.resp, len(paths), levels+1, link)
	}
}

// An entry too big for one message (a path and link text of bytes that are not
// UTF-8, six bytes each once escaped) was left out of a listing without a word,
// and its stat failed "internal" naming no path. Both say which entry now.
func TestAnEntryTooBigForAMessageIsNamed(t *testing.T) {
	dir := t.TempDir()
	for _, b := range []string{"\xff", "\xfe", "\xfd", "\xfc", "\xfb", "\xfa"} {
		dir = filepath.Join(dir, strings.Repeat(b, 250))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "l")
	if err := os.Symlink(strings.Repeat("<", 4095), link); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	for i, op := range []string{"list", "stat"} {
		path := dir
		if op == "stat" {
			path = link
		}
		r := c.call(uint32(i+1), map[string]any{"op": op, "path": fsName(path)})
		msg, _ := r.resp["error"].(string)
		if r.resp["code"] != "invalid" || !strings.HasSuffix(msg, "/l: its entry does not fit one message "+
			"(its path and link text, escaped, pass "+fmt.Sprint(batchLimit)+" bytes)") {
			t.Fatalf("%s: %v", op, r.resp)
		}
	}
}
