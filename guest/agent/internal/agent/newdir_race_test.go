package agent

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// mkdir (and write_file's mkdirs) chmod the new directory by path, following a
// symlink: a guest process that owns the parent swaps the new directory for a
// link between mkdir(2) and chmod(2), and a root file of its choosing gets the
// directory's mode.
func TestMkdirOfADirectorySwappedForALinkLeavesTheLinksTargetAlone(t *testing.T) {
	raceNewDirsWithLinks(t, func(c *client, id uint32, dir string) {
		os.Remove(dir)
		c.call(id, map[string]any{"op": "mkdir", "path": dir, "parents": false, "mode": 0o777})
	})
}

// The same race through the directories write_file makes for its file.
func TestWriteMkdirsOfADirectorySwappedForALinkLeavesTheLinksTargetAlone(t *testing.T) {
	raceNewDirsWithLinks(t, func(c *client, id uint32, dir string) {
		os.RemoveAll(dir)
		c.writeVia(id, map[string]any{"path": dir + "/f"}, "x")
	})
}

// raceNewDirsWithLinks has `request` make directories for 4 s while a racing
// process swaps each new one for a link to a root 0600 file, which must keep
// its mode.
func raceNewDirsWithLinks(t *testing.T, request func(c *client, id uint32, dir string)) {
	d := t.TempDir()
	victim := d + "/shadow"
	os.WriteFile(victim, []byte("secret"), 0o600)
	work := d + "/home"
	os.Mkdir(work, 0o777)
	c := newClient(t, nil)
	var stop atomic.Bool
	done := make(chan struct{})
	go func() { // the guest user's racing process
		defer close(done)
		for !stop.Load() {
			for i := 0; i < 4; i++ {
				n := fmt.Sprintf("%s/out%d", work, i)
				if syscall.Rmdir(n) == nil {
					syscall.Symlink(victim, n)
				}
			}
		}
	}()
	deadline := time.Now().Add(4 * time.Second)
	tries := 0
	for time.Now().Before(deadline) {
		tries++
		request(c, uint32(10+tries), fmt.Sprintf("%s/out%d", work, tries%4))
		var st syscall.Stat_t
		syscall.Stat(victim, &st)
		if st.Mode&0o7777 != 0o600 {
			t.Logf("after %d requests: %s is now mode %o (was 600)", tries, victim, st.Mode&0o7777)
			break
		}
	}
	stop.Store(true)
	<-done
	var st syscall.Stat_t
	syscall.Stat(victim, &st)
	if st.Mode&0o7777 != 0o600 {
		t.Errorf("a root file outside the request got mode %o through a swapped link (%d tries)", st.Mode&0o7777, tries)
	} else {
		t.Logf("race not hit in %d tries", tries)
	}
}

// write_file over a root:root file in a setgid directory: the replacement
// should keep the old file's owner (root:root), not take the directory's group.
func TestAReplacedRootFileInASetgidDirectoryKeepsItsGroup(t *testing.T) {
	d := t.TempDir() + "/shared"
	os.Mkdir(d, 0o775)
	os.Chown(d, 0, 4242)
	if err := syscall.Chmod(d, 0o2775); err != nil {
		t.Fatal(err)
	}
	dst := statT(t, d)
	t.Logf("dir: gid=%d mode=%o", dst.Gid, dst.Mode&0o7777)
	p := d + "/f"
	os.WriteFile(p, []byte("old"), 0o640)
	os.Chown(p, 0, 0) // a root:root file in the shared tree
	st := statT(t, p)
	t.Logf("before: uid=%d gid=%d mode=%o", st.Uid, st.Gid, st.Mode&0o7777)
	c := newClient(t, nil)
	resp := c.writeVia(1, map[string]any{"path": p}, "new")
	st = statT(t, p)
	t.Logf("write_file %v; after: uid=%d gid=%d mode=%o", resp, st.Uid, st.Gid, st.Mode&0o7777)
	if st.Gid != 0 {
		t.Errorf("replaced file's group changed 0 -> %d (doc: the replacement keeps the old file's owner)", st.Gid)
	}
}
