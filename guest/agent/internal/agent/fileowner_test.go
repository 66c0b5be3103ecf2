package agent

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// What the files API creates is the sandbox's user's (the image's USER), so
// that user's commands can change it: it was root's, and `echo >> notes.txt`
// as the user failed "Permission denied". A file it replaces keeps its owner.
func TestFilesCreatedBelongToTheSandboxsUser(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // t.TempDir's are root's alone
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.call(1, map[string]any{"op": "set_defaults", "user": "nobody"})
	a, err := lookupAccount("nobody")
	if err != nil {
		t.Fatal(err)
	}

	c.writeVia(2, map[string]any{"path": dir + "/new/sub/notes.txt"}, "hello")
	c.call(3, map[string]any{"op": "mkdir", "path": dir + "/proj/src", "mode": 0o700})
	for _, p := range []string{dir + "/new", dir + "/new/sub", dir + "/new/sub/notes.txt",
		dir + "/proj", dir + "/proj/src"} {
		if st := statT(t, p); st.Uid != a.uid || st.Gid != a.gid {
			t.Fatalf("%s is %d:%d, not nobody's", p, st.Uid, st.Gid)
		}
	}
	// mkdir -p -m: the mode is the last directory's; its parents get 0755
	if m := statT(t, dir+"/proj").Mode & 0o777; m != 0o755 {
		t.Fatalf("parent mode %o", m)
	}
	if m := statT(t, dir+"/proj/src").Mode & 0o777; m != 0o700 {
		t.Fatalf("leaf mode %o", m)
	}
	r := c.call(4, map[string]any{"op": "exec", "cmd": "echo more >> " + dir + "/new/sub/notes.txt && touch " +
		dir + "/proj/src/main.py"})
	if num(r.resp["exit_code"]) != 0 {
		t.Fatalf("the user cannot change what was written for them: %q %v", r.err, r.resp)
	}
	// a file root owns stays root's when replaced; a request may name the user
	root := dir + "/root-owned"
	if err := os.WriteFile(root, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.writeVia(5, map[string]any{"path": root}, "y")
	c.writeVia(6, map[string]any{"path": dir + "/as-root", "user": "root"}, "z")
	for _, p := range []string{root, dir + "/as-root"} {
		if uid := statT(t, p).Uid; uid != 0 {
			t.Fatalf("%s is uid %d", p, uid)
		}
	}
	r = c.call(7, map[string]any{"op": "mkdir", "path": dir + "/x", "user": "no-such-user"})
	if r.resp["code"] != "invalid" {
		t.Fatalf("unknown user: %v", r.resp)
	}
}

// mkdir -p of a dangling symlink is refused (exists), not answered ok with
// nothing made.
func TestMkdirOfADanglingLinkIsRefused(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.Symlink(dir+"/nowhere", dir+"/dl"); err != nil {
		t.Fatal(err)
	}
	if r := c.call(1, map[string]any{"op": "mkdir", "path": dir + "/dl"}); r.resp["ok"] != false {
		t.Fatalf("%v", r.resp)
	}
}

// Directories made in a setgid tree (a shared group's) keep the setgid bit
// they take from their parent: the explicit chmod took it away.
func TestMkdirInASetgidTreeKeepsSetgid(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := syscall.Chmod(dir, 0o2775); err != nil { // os.Chmod would drop 0o2000
		t.Fatal(err)
	}
	c.call(1, map[string]any{"op": "mkdir", "path": dir + "/a/b", "mode": 0o750})
	for p, want := range map[string]os.FileMode{dir + "/a": 0o755, dir + "/a/b": 0o750} {
		if fi, err := os.Stat(p); err != nil || fi.Mode()&os.ModeSetgid == 0 || fi.Mode().Perm() != want {
			t.Fatalf("%s: %v %v", p, fi.Mode(), err)
		}
	}
}

// In a setgid directory (a tree a group shares), what the files API makes for
// a user keeps the directory's group, as the user's own mkdir or write would:
// it took the user's own group, which then spread to all made under it.
func TestFilesMadeForAUserInASetgidDirectoryKeepItsGroup(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // t.TempDir's are root's alone
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const group = 50 // not nobody's
	shared := dir + "/shared"
	if err := os.Mkdir(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(shared, 0, group); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o777|os.ModeSetgid); err != nil {
		t.Fatal(err)
	}
	a, err := lookupAccount("nobody")
	if err != nil {
		t.Fatal(err)
	}
	c.call(1, map[string]any{"op": "set_defaults", "user": "nobody"})
	c.call(2, map[string]any{"op": "mkdir", "path": shared + "/made/sub"})
	c.writeVia(3, map[string]any{"path": shared + "/notes.txt"}, "x")
	c.writeVia(4, map[string]any{"path": shared + "/made/sub/more.txt", "append": true}, "y")
	r := c.call(5, map[string]any{"op": "exec", "cmd": "mkdir " + shared + "/own && echo x > " + shared + "/own.txt"})
	if num(r.resp["exit_code"]) != 0 {
		t.Fatalf("the user's own mkdir: %q %v", r.err, r.resp)
	}
	for _, name := range []string{"own", "own.txt", "made", "made/sub", "notes.txt", "made/sub/more.txt"} {
		if st := statT(t, shared+"/"+name); st.Uid != a.uid || st.Gid != group {
			t.Errorf("%s is %d:%d, want %d:%d", name, st.Uid, st.Gid, a.uid, group)
		}
	}
	// outside such a directory the user's own group, as before
	c.writeVia(6, map[string]any{"path": dir + "/plain.txt"}, "z")
	if st := statT(t, dir+"/plain.txt"); st.Gid != a.gid {
		t.Errorf("plain.txt has group %d, want nobody's %d", st.Gid, a.gid)
	}
}
