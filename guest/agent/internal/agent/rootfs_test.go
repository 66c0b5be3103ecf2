package agent

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMatchOwnerAndModeCopiesTheImageRoot(t *testing.T) {
	dir := t.TempDir()
	image, upper := filepath.Join(dir, "image"), filepath.Join(dir, "upper")
	if err := os.Mkdir(image, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(upper, 0o755); err != nil {
		t.Fatal(err)
	}
	// Mkdir applies the umask; set the modes we mean exactly.
	if err := unix.Chmod(image, 0o1750); err != nil {
		t.Fatal(err)
	}
	if os.Getuid() == 0 { // root may give the image root another owner
		if err := os.Chown(image, 1234, 5678); err != nil {
			t.Fatal(err)
		}
	}
	if err := matchOwnerAndMode(upper, image); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(upper)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Mode() & (os.ModePerm | os.ModeSticky); got != 0o750|os.ModeSticky {
		t.Errorf("upper mode = %v, want the image root's (sticky, 0750)", got)
	}
	if uid, gid := ownerOf(t, upper); uid != uidOf(t, image) || gid != gidOf(t, image) {
		t.Errorf("upper owner = %d:%d, want the image root's", uid, gid)
	}
}

func TestMatchOwnerAndModeNamesAMissingDirectory(t *testing.T) {
	dir := t.TempDir()
	if err := matchOwnerAndMode(filepath.Join(dir, "upper"), dir); err == nil {
		t.Fatal("want an error for a missing upper directory")
	}
}

func ownerOf(t *testing.T, path string) (uint32, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid, st.Gid
}

func uidOf(t *testing.T, path string) uint32 { u, _ := ownerOf(t, path); return u }
func gidOf(t *testing.T, path string) uint32 { _, g := ownerOf(t, path); return g }
