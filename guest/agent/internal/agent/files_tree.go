package agent

import (
	"encoding/json"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The tree ops: stat, list (batched, with depth), mkdir, remove, rename.

// entry is the JSON form of a directory entry (stat, list).
func entry(path string, fi os.FileInfo) map[string]any {
	st, _ := fi.Sys().(*syscall.Stat_t)
	t := "other"
	switch {
	case fi.Mode().IsRegular():
		t = "file"
	case fi.IsDir():
		t = "dir"
	case fi.Mode()&os.ModeSymlink != 0:
		t = "symlink"
	}
	e := map[string]any{"name": fsName(fi.Name()), "path": fsName(path), "type": t, "size": fi.Size(),
		"mtime_ns": unixNanoSaturated(fi.ModTime())}
	if st != nil {
		e["mode"], e["uid"], e["gid"] = st.Mode&0o7777, st.Uid, st.Gid
	}
	if t == "symlink" {
		if l, err := os.Readlink(path); err == nil {
			e["link"] = fsName(l)
		}
	}
	return e
}

func opStat(s *Server, ch *Channel, raw []byte) (any, error) {
	_, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	e := entry(path, fi)
	if path == "/" {
		e["name"] = "/"
	}
	if b, err := json.Marshal(e); err != nil || len(b) > batchLimit {
		return nil, errTooBigAnEntry(path)
	}
	return ok("entry", e), nil
}

// errTooBigAnEntry names an entry whose JSON does not fit one frame: a path
// and link text of thousands of bytes that are not UTF-8 (escaped, each takes
// six). It was left out of a listing without a word.
func errTooBigAnEntry(path string) error {
	return errf("invalid", "%s: its entry does not fit one message (its path and link "+
		"text, escaped, pass %d bytes)", path, batchLimit)
}

func opList(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	depth := 1
	if r.Depth != nil {
		depth = *r.Depth
	}
	if depth < 1 || depth > 64 {
		return nil, errf("invalid", "depth must be 1..64")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, errf("not_dir", "%s is not a directory", path)
	}
	l := &lister{ch: ch}
	f, err := openListed(path, true)
	if err != nil {
		return nil, err
	}
	if err := l.walk(f, path, depth); err != nil {
		if err == errConnClosed {
			return nil, nil
		}
		return nil, err
	}
	if err := l.flush(); err != nil {
		return nil, nil
	}
	return ok("count", l.count), nil
}

// lister batches entries into EVENTs that each fit one frame.
type lister struct {
	ch    *Channel
	batch []json.RawMessage
	size  int
	count int
}

const batchLimit = MaxOutPayload - 256

func (l *lister) add(e map[string]any) error {
	b, err := json.Marshal(e)
	if err != nil || len(b) > batchLimit {
		return errTooBigAnEntry(string(e["path"].(fsName)))
	}
	if l.size+len(b)+1 > batchLimit {
		if err := l.flush(); err != nil {
			return err
		}
	}
	l.batch = append(l.batch, b)
	l.size += len(b) + 1
	l.count++
	return nil
}

func (l *lister) flush() error {
	if len(l.batch) == 0 {
		return nil
	}
	err := l.ch.Event(map[string]any{"event": "entries", "entries": l.batch})
	l.batch, l.size = nil, 0
	return err
}

// errListCancelled ends a listing the host cancelled, at any depth.
var errListCancelled = errf("io", "cancelled")

// listBatch is how many names of a directory a listing reads at a time: it
// never holds a whole directory (os.ReadDir of 300,000 names took 49 MiB of a
// guest's memory), so entries come in the directory's order; the host sorts.
const listBatch = 1024

// listedFlags open a directory to list: only a directory, never waiting
// (a guest process may swap what a stat found for a FIFO, whose open would
// wait for a writer for good, past any CANCEL).
const listedFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NONBLOCK | unix.O_CLOEXEC

// openListed opens a directory to list by its path: below the listed path
// (top false) never through a symlink swapped in since a stat.
func openListed(dir string, top bool) (*os.File, error) {
	flags := listedFlags
	if !top {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := unix.Open(dir, flags, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// openListedIn opens the subdirectory name of the open directory parent, as
// openListed does below the top: by the parent's fd, so at any depth (a
// path past PATH_MAX cannot be opened by its path).
func openListedIn(parent *os.File, name, path string) (*os.File, error) {
	fd, err := unix.Openat(int(parent.Fd()), name, listedFlags|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// listedEntry is the entry of name in the open directory dir, at path. By
// path as a rule (one lstat); by the directory's fd for a path past
// PATH_MAX, which lstat refuses (ENAMETOOLONG): such entries went missing
// from listings without a word. ok is false for one gone meanwhile.
func listedEntry(dir *os.File, de os.DirEntry, path string) (map[string]any, bool) {
	fi, err := de.Info()
	if err == nil {
		return entry(path, fi), true
	}
	if !errors.Is(err, syscall.ENAMETOOLONG) {
		return nil, false
	}
	fd, err := unix.Openat(int(dir.Fd()), de.Name(), unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, false
	}
	f := os.NewFile(uintptr(fd), de.Name())
	defer f.Close()
	if fi, err = f.Stat(); err != nil {
		return nil, false
	}
	e := entry(path, fi) // its link by path fails: read through the fd instead
	if fi.Mode()&os.ModeSymlink != 0 {
		buf := make([]byte, unix.PathMax)
		if n, err := unix.Readlinkat(fd, "", buf); err == nil {
			e["link"] = fsName(string(buf[:n]))
		}
	}
	return e, true
}

func (l *lister) walk(f *os.File, dir string, depth int) error {
	defer f.Close()
	for {
		ents, err := f.ReadDir(listBatch)
		if err := l.walkEntries(f, dir, ents, depth); err != nil {
			return err
		}
		if err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

func (l *lister) walkEntries(f *os.File, dir string, ents []os.DirEntry, depth int) error {
	for _, de := range ents {
		select {
		case <-l.ch.cancel:
			return errListCancelled
		default:
		}
		p := filepath.Join(dir, de.Name())
		e, ok := listedEntry(f, de, p)
		if !ok {
			continue // vanished meanwhile
		}
		if err := l.add(e); err != nil {
			return err
		}
		if depth > 1 && e["type"] == "dir" {
			// an unreadable subdirectory is skipped; a cancel, a lost
			// connection or an entry that cannot be sent ends the whole listing
			sub, err := openListedIn(f, de.Name(), p)
			if err != nil {
				continue
			}
			var ends *apiError
			if err := l.walk(sub, p, depth-1); err == errConnClosed || errors.As(err, &ends) {
				return err
			}
		}
	}
	return nil
}

func opMkdir(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	mode, err := fileMode(r.Mode, 0o755)
	if err != nil {
		return nil, err
	}
	owner, err := s.fileOwner(r.User)
	if err != nil {
		return nil, err
	}
	if r.Parents == nil || *r.Parents {
		fi, serr := os.Stat(path)
		switch {
		case serr == nil && !fi.IsDir():
			return nil, errf("exists", "%s exists and is not a directory", path)
		case serr == nil:
			return ok(), nil // mkdir -p: an existing directory is left as it is
		case !os.IsNotExist(serr):
			// "file/" (ENOTDIR): mkdirs, cleaning the slash off, would find file there
			return nil, serr
		}
		err = mkdirs(path, mode, owner)
	} else if err = os.Mkdir(path, mode); err == nil {
		err = settleNewDir(path, mode, owner)
	}
	if err != nil {
		return nil, err
	}
	return ok(), nil
}

func opRemove(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	if path == "/" {
		return nil, errf("invalid", "refusing to remove /")
	}
	if _, err := os.Lstat(path); err != nil {
		return nil, err
	}
	if err := refuseLinkAsDir(path); err != nil {
		return nil, err
	}
	if r.Recursive {
		// RemoveAll holds an fd per level: a tree deeper than the open files
		// limit left for init needs it raised (a chain of mkdirs is easy to make)
		if err = os.RemoveAll(path); errors.Is(err, syscall.EMFILE) && raiseOpenFilesLimit() {
			err = os.RemoveAll(path)
		}
	} else {
		err = os.Remove(path)
	}
	if err != nil {
		return nil, err
	}
	return ok(), nil
}

// refuseLinkAsDir refuses to remove "link/" where link leads to a directory:
// that names the directory, but os.RemoveAll would unlink the link and keep
// the entries (and rm -rf empties the directory, then fails on the link).
// Refused before anything is touched, saying which of the two to remove.
func refuseLinkAsDir(path string) error {
	link, ok := strings.CutSuffix(path, "/")
	if !ok {
		return nil
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		return nil
	}
	return errf("invalid", "%s is a symlink to a directory: remove %q to remove the link, "+
		"or the entries under it to empty the directory", path, link)
}

func opRename(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op  string `json:"op"`
		Src fsName `json:"src"`
		Dst fsName `json:"dst"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	src, err := s.reqPath("src", string(r.Src))
	if err != nil {
		return nil, err
	}
	dst, err := s.reqPath("dst", string(r.Dst))
	if err != nil {
		return nil, err
	}
	// rename(2) as it is: os.Rename refuses to replace an empty directory
	switch err := unix.Rename(src, dst); {
	case err == unix.EXDEV:
		return nil, errf("cross_device", "rename %s to %s: they are on different filesystems (copy, then remove)", src, dst)
	case err != nil:
		return nil, &os.LinkError{Op: "rename", Old: src, New: dst, Err: err}
	}
	return ok(), nil
}

// unixNanoSaturated is t in ns since the epoch, held at int64's ends: past
// 2262 (or before 1677) UnixNano wraps to a wrong date.
func unixNanoSaturated(t time.Time) int64 {
	const limit = math.MaxInt64 / int64(time.Second)
	switch sec := t.Unix(); {
	case sec >= limit:
		return math.MaxInt64
	case sec <= -limit:
		return math.MinInt64
	}
	return t.UnixNano()
}
