package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// treeWatch is a directory, or a tree of them, watched through inotify.
//
// inotify watches inodes, one per directory, and names what changed in a
// watched directory by its name there; the paths of the directories are ours
// to keep. Here they follow the tree: a directory renamed inside it keeps its
// watches under the new path (fsnotify dropped them at its IN_MOVE_SELF), one
// created or moved in is watched with everything under it (its contents are
// reported as created: they were made before its watch existed), one moved
// out is no longer watched, and the count of watched directories is of those
// watched now, not of all ever added.
type treeWatch struct {
	fd     int // owned by f; used only while f is open
	f      *os.File
	root   string
	rootWd int32
	// the root's parent, watched for the root's own name: a directory removed
	// while some process still uses it (its cwd) sends IN_DELETE_SELF only when
	// the last of them lets go. 0: none (the root is /).
	parentWd  int32
	rootName  string
	recursive bool
	paths     map[int32]string  // watch descriptor -> directory
	wds       map[string]int32  // directory -> watch descriptor
	movedFrom map[uint32]string // rename cookie -> where a directory renamed away waits (movedPrefix)
	// path -> where the watches of the directory a rename onto path displaced wait
	// (movedPrefix) until the read ends: in an exchange (mv --exchange a b) it comes
	// right back out as the next rename's source
	displaced    map[string]string
	displacedSeq uint64
	limit        int // directories at most
	limitSaid    bool
	stop         func() bool // a CANCEL or a lost connection: stop walking
}

// fsChange is one change reported to the host: op is create, write, remove,
// rename, chmod, or overflow (changes were lost: the kernel's queue or the
// directory limit was full). end: the watched directory itself went away.
type fsChange struct {
	op, path string
	end      bool
}

// movedPrefix keys the watches of a directory renamed away until its new name
// comes: out of the tree's paths, so that a directory made at its old path
// meanwhile (mv a out; mkdir a) is not mistaken for it. No real path starts
// with a NUL.
const movedPrefix = "\x00moved/"

const watchMask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_ONLYDIR

var errWatchLimit = errors.New("directory limit reached")

// inotifyInstances is the guest's limit of inotify instances a user (root:
// the agent and every root process) may hold; raised at boot from the
// kernel's 128, which a busy agent's watches and a dev server's could share.
const (
	inotifyInstances     = "/proc/sys/fs/inotify/max_user_instances"
	inotifyInstancesBoot = 1024
)

// raiseInotifyInstances lifts the limit to inotifyInstancesBoot, never lowers it.
func raiseInotifyInstances() error {
	return raiseKnob(inotifyInstances, inotifyInstancesBoot)
}

func newTreeWatch(root string, recursive bool, stop func() bool) (*treeWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err == unix.EMFILE {
		// one instance a watch, shared with every root process of the guest
		limit, _ := os.ReadFile(inotifyInstances)
		return nil, errf("busy", "watch %s: the guest's limit of inotify instances "+
			"(fs.inotify.max_user_instances = %s) is reached: close other watches, or raise it",
			root, strings.TrimSpace(string(limit)))
	}
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	t := &treeWatch{fd: fd, f: os.NewFile(uintptr(fd), "inotify"), root: root, recursive: recursive,
		paths: map[int32]string{}, wds: map[string]int32{}, movedFrom: map[uint32]string{},
		displaced: map[string]string{}, limit: maxWatchDirs, stop: stop}
	// the root is followed if it is a symlink, as it was resolved once, at the start
	wd, err := t.add(root, true)
	if err != nil {
		t.f.Close()
		return nil, &os.PathError{Op: "watch", Path: root, Err: err}
	}
	t.rootWd = wd
	t.watchRootsName()
	return t, nil
}

// watchRootsName watches the root's parent for the root's removal or rename
// (best effort: without it the root's own events still end the watch).
func (t *treeWatch) watchRootsName() {
	root := filepath.Clean(t.root)
	parent := filepath.Dir(root)
	if parent == root {
		return
	}
	w, err := unix.InotifyAddWatch(t.fd, parent, unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_ONLYDIR)
	if _, inTree := t.paths[int32(w)]; err != nil || inTree {
		return // a parent that is also in the tree (bind mounts) keeps the tree's mask
	}
	t.parentWd, t.rootName = int32(w), filepath.Base(root)
}

func (t *treeWatch) Close() error { return t.f.Close() }

// add watches dir; a directory already watched (the same inode under a new
// name too) keeps its descriptor.
func (t *treeWatch) add(dir string, follow bool) (int32, error) {
	if _, ok := t.wds[dir]; !ok && len(t.paths) >= t.limit {
		return 0, errWatchLimit
	}
	mask := uint32(watchMask)
	if !follow {
		mask |= unix.IN_DONT_FOLLOW
	}
	w, err := unix.InotifyAddWatch(t.fd, dir, mask)
	if err != nil {
		return 0, err
	}
	wd := int32(w)
	if old, ok := t.paths[wd]; ok && old != dir {
		delete(t.wds, old)
	}
	t.paths[wd], t.wds[dir] = dir, wd
	return wd, nil
}

// addTree watches the directories under dir (dir included unless it is the
// root, watched already) and, with report, tells of each entry under it as
// created. It skips the kernel's pseudo-filesystems (inotify reports nothing
// there, and /proc alone holds thousands of directories) and stops at the
// directory limit (said once, as an overflow) or when stop says so. It reads
// listBatch names at a time and keeps no directory open while it goes down
// (a directory of 300,000 names read whole took ~65 MiB of the guest's
// memory; an fd per level ran a deep tree out of them): what is still to walk
// is a list of paths, no longer than the directory limit leaves room for.
func (t *treeWatch) addTree(dir string, report bool, emit func(fsChange) bool) bool {
	pending := []string{dir}
	for len(pending) > 0 && !t.stop() {
		p := pending[len(pending)-1]
		pending = pending[:len(pending)-1]
		if p != t.root {
			if onKernelFS(p) {
				continue
			}
			if _, err := t.add(p, false); errors.Is(err, errWatchLimit) || errors.Is(err, unix.ENOSPC) {
				return t.sayLimit(emit)
			} else if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENOENT) {
				continue // not a directory (any more)
			}
		}
		// only the root is followed if it is a link (as it was at the start)
		room := t.limit - len(t.paths) - len(pending)
		found, alive := t.walkDir(p, p == t.root, report, room, emit)
		if !alive {
			return false
		}
		if len(found) > room {
			return t.sayLimit(emit)
		}
		pending = append(pending, found...)
	}
	return true
}

// sayLimit tells of the directory limit, once until watches free up, as an
// overflow: whether emit took it.
func (t *treeWatch) sayLimit(emit func(fsChange) bool) bool {
	if t.limitSaid {
		return true
	}
	t.limitSaid = true
	return emit(fsChange{op: "overflow", path: t.rootPath()})
}

// walkDir reads dir a batch at a time, reporting each entry as created when
// report says so: the subdirectories found (it stops past room of them), and
// false once emit refused. A
// directory not readable (gone meanwhile, or swapped for a FIFO or a link by
// a guest process) has nothing to walk.
func (t *treeWatch) walkDir(dir string, top, report bool, room int, emit func(fsChange) bool) ([]string, bool) {
	f, err := openListed(dir, top)
	if err != nil {
		return nil, true
	}
	defer f.Close()
	var subdirs []string
	for !t.stop() {
		ents, err := f.ReadDir(listBatch)
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			if report && !emit(fsChange{op: "create", path: p}) {
				return nil, false
			}
			if e.IsDir() {
				if subdirs = append(subdirs, p); len(subdirs) > room {
					return subdirs, true
				}
			}
		}
		if err != nil {
			break // io.EOF, or unreadable from here on
		}
	}
	return subdirs, true
}

// under lists the watched directories at or below dir.
func (t *treeWatch) under(dir string) []string {
	var out []string
	for p := range t.wds {
		if p == dir || strings.HasPrefix(p, dir+"/") || dir == "/" && !strings.HasPrefix(p, movedPrefix) {
			out = append(out, p)
		}
	}
	return out
}

// rootPath is the watched path as reported (without the trailing slash a
// request may have given it).
func (t *treeWatch) rootPath() string { return filepath.Clean(t.root) }

// repath gives the watches of a directory renamed (and of everything under
// it) its new path; watches still held at that path (a directory the rename
// replaced, or in an exchange moved away) wait in displaced.
func (t *treeWatch) repath(from, to string) {
	if from == to {
		return
	}
	if _, held := t.wds[to]; held && !strings.HasPrefix(to, movedPrefix) {
		t.displacedSeq++
		parked := movedPrefix + "displaced/" + strconv.FormatUint(t.displacedSeq, 10)
		t.move(to, parked)
		t.displaced[to] = parked
	}
	t.move(from, to)
}

// move gives the watches at and under from the paths at and under to.
func (t *treeWatch) move(from, to string) {
	for _, p := range t.under(from) {
		wd := t.wds[p]
		np := to + strings.TrimPrefix(p, from)
		delete(t.wds, p)
		t.paths[wd], t.wds[np] = np, wd
	}
}

// forget stops watching a directory moved out of the tree: its events would
// come under a path that is no longer its.
func (t *treeWatch) forget(dir string) {
	for _, p := range t.under(dir) {
		wd := t.wds[p]
		_, _ = unix.InotifyRmWatch(t.fd, uint32(wd))
		t.drop(wd)
	}
}

func (t *treeWatch) drop(wd int32) {
	if p, ok := t.paths[wd]; ok {
		delete(t.paths, wd)
		if t.wds[p] == wd {
			delete(t.wds, p)
		}
	}
	if len(t.paths) < t.limit {
		t.limitSaid = false // the next time the limit is reached is said again
	}
}

// handle turns one read's events into changes. It returns false when the
// watch has ended: its root went away, or emit refused (the channel closed).
func (t *treeWatch) handle(buf []byte, emit func(fsChange) bool) bool {
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		nameAt := off + unix.SizeofInotifyEvent
		off = nameAt + int(ev.Len)
		if off > len(buf) {
			break // the kernel never splits an event: not reached
		}
		if !t.one(ev, strings.TrimRight(string(buf[nameAt:off]), "\x00"), emit) {
			return false
		}
	}
	// A directory renamed away whose new name did not follow in the same read
	// left the tree (a pair split across reads is rare, and only costs a walk).
	for cookie, dir := range t.movedFrom {
		t.forget(dir)
		delete(t.movedFrom, cookie)
	}
	for to, dir := range t.displaced { // replaced for good: not renamed on
		t.forget(dir)
		delete(t.displaced, to)
	}
	return true
}

func (t *treeWatch) one(ev *unix.InotifyEvent, name string, emit func(fsChange) bool) bool {
	mask := ev.Mask
	if mask&unix.IN_Q_OVERFLOW != 0 {
		if !emit(fsChange{op: "overflow", path: t.rootPath()}) {
			return false
		}
		// directories made (or renamed) while the kernel dropped events are watched
		// from here on too: the walk adds what it finds, keeping the watches it has
		return !t.recursive || t.addTree(t.root, false, emit)
	}
	if t.parentWd != 0 && ev.Wd == t.parentWd {
		if name != t.rootName || mask&(unix.IN_DELETE|unix.IN_MOVED_FROM) == 0 {
			return true // a neighbour of the root, or the parent's own end
		}
		op := "remove"
		if mask&unix.IN_MOVED_FROM != 0 {
			op = "rename"
		}
		emit(fsChange{op: op, path: t.rootPath(), end: true})
		return false // nothing more can come under the watched path
	}
	dir, ok := t.paths[ev.Wd]
	if !ok {
		return true // a watch dropped already; its last events may still come
	}
	if strings.HasPrefix(dir, movedPrefix) {
		// in a directory renamed away, before its new name came: where it
		// went is not known yet (and if it left the tree, it is not ours)
		if mask&unix.IN_IGNORED != 0 {
			t.drop(ev.Wd)
		}
		return true
	}
	p := dir
	switch {
	case name != "":
		p = filepath.Join(dir, name)
	case ev.Wd == t.rootWd:
		p = t.rootPath() // as every other report names it: without a request's slash
	case mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) == 0:
		return true // a subdirectory's own chmod: its parent reports it, by name
	}
	switch {
	case mask&unix.IN_IGNORED != 0: // removed, unmounted, or rm_watch'ed
		t.drop(ev.Wd)
		return ev.Wd != t.rootWd
	case mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
		if ev.Wd != t.rootWd {
			return true // its parent reported it, by name
		}
		op := "remove"
		if mask&unix.IN_MOVE_SELF != 0 {
			op = "rename"
		}
		emit(fsChange{op: op, path: t.rootPath(), end: true})
		return false // nothing more can come under the watched path
	}
	isDir := mask&unix.IN_ISDIR != 0
	if mask&unix.IN_MOVED_FROM != 0 {
		if !emit(fsChange{op: "rename", path: p}) {
			return false
		}
		parked := movedPrefix + strconv.FormatUint(uint64(ev.Cookie), 10)
		if d, ok := t.displaced[p]; isDir && t.recursive && ok {
			// the directory an earlier rename in this read displaced moves on (an
			// exchange): its watches, not those that just took its name
			delete(t.displaced, p)
			t.move(d, parked)
			t.movedFrom[ev.Cookie] = parked
		} else if _, watched := t.wds[p]; isDir && t.recursive && watched {
			t.repath(p, parked)
			t.movedFrom[ev.Cookie] = parked
		}
	}
	if mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 {
		if !emit(fsChange{op: "create", path: p}) {
			return false
		}
		if isDir && t.recursive {
			if from, ok := t.movedFrom[ev.Cookie]; ok && mask&unix.IN_MOVED_TO != 0 {
				delete(t.movedFrom, ev.Cookie)
				t.repath(from, p) // renamed inside the tree: its watches moved with it
			} else if !t.addTree(p, true, emit) {
				return false
			}
		}
	}
	for _, o := range []struct {
		bit uint32
		op  string
	}{{unix.IN_DELETE, "remove"}, {unix.IN_MODIFY, "write"}, {unix.IN_ATTRIB, "chmod"}} {
		if mask&o.bit != 0 && !emit(fsChange{op: o.op, path: p}) {
			return false
		}
	}
	return true
}

// reads delivers each read of the inotify fd until it is closed or done is.
func (t *treeWatch) reads(done <-chan struct{}) <-chan []byte {
	out := make(chan []byte)
	go func() {
		defer close(out)
		for {
			buf := make([]byte, 64<<10)
			n, err := t.f.Read(buf)
			if err != nil || n <= 0 {
				return
			}
			select {
			case out <- buf[:n]:
			case <-done:
				return
			}
		}
	}()
	return out
}
