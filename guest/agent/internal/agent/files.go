package agent

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type fileReq struct {
	Op        string `json:"op"`
	Path      string `json:"path"`
	Offset    int64  `json:"offset"`
	Length    *int64 `json:"length"`
	Mode      *int64 `json:"mode"`
	Append    bool   `json:"append"`
	Mkdirs    *bool  `json:"mkdirs"`
	Depth     *int   `json:"depth"`
	Parents   *bool  `json:"parents"`
	Recursive bool   `json:"recursive"`
	// whose what write_file and mkdir create is (default: the sandbox's user)
	User json.RawMessage `json:"user"`
}

func fileMode(m *int64, def os.FileMode) (os.FileMode, error) {
	if m == nil {
		return def, nil
	}
	if *m < 0 || *m > 0o7777 {
		return 0, errf("invalid", "mode must be 0..0o7777")
	}
	fm := os.FileMode(*m & 0o777)
	if *m&0o4000 != 0 {
		fm |= os.ModeSetuid
	}
	if *m&0o2000 != 0 {
		fm |= os.ModeSetgid
	}
	if *m&0o1000 != 0 {
		fm |= os.ModeSticky
	}
	return fm, nil
}

func opReadFile(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	length := int64(-1)
	if r.Length != nil {
		length = *r.Length
	}
	if r.Offset < 0 || length < -1 {
		return nil, errf("invalid", "offset must be >= 0 and length >= -1")
	}
	f, st, err := openFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return nil, errf("is_dir", "%s is a directory", path)
	}
	if err := ch.Event(map[string]any{"event": "file", "size": st.Size, "mode": st.Mode & 0o7777}); err != nil {
		return nil, nil
	}
	ch.closeIn()
	// A device gives records (/dev/kmsg: one a read, EINVAL for a buffer left
	// too small), so it gets one read a frame where a file's ReadAt fills it.
	device := st.Mode&syscall.S_IFMT == syscall.S_IFCHR
	if device && r.Offset > 0 {
		if _, err := f.Seek(r.Offset, io.SeekStart); err != nil {
			return nil, errf("invalid", "%s is a device that cannot be read from offset %d: %v",
				path, r.Offset, errnoText(err))
		}
	}
	var sent int64
	off := r.Offset
	for length < 0 || sent < length {
		want := MaxOutPayload
		if length >= 0 {
			want = int(min(int64(want), length-sent))
		}
		var k int
		if device {
			k, err = ch.acquireAll(want, ch.cancel) // a record cut by the window would lose its rest
		} else {
			k, err = ch.acquire(want, ch.cancel)
		}
		if err == errAborted {
			return nil, errf("io", "cancelled")
		} else if err != nil {
			return nil, nil
		}
		pb, buf := newDataFrame(k)
		var n int
		var rerr error
		if device {
			n, rerr = readDevice(f, pb, k)
		} else {
			n, rerr = f.ReadAt(buf[headerSize:headerSize+k], off)
		}
		if errors.Is(rerr, syscall.EAGAIN) {
			rerr = io.EOF // opened non-blocking (a FIFO must not hang the open): all there is
		}
		ch.addCredit(int64(k - n))
		if n > 0 {
			if ch.sendData(KindOut, pb, buf[:headerSize+n]) != nil {
				return nil, nil
			}
			off += int64(n)
			sent += int64(n)
		} else {
			framePool.Put(pb)
		}
		if rerr == io.EOF {
			break
		} else if rerr != nil {
			return nil, pathErr("read", path, rerr)
		}
	}
	return ok("bytes", sent), nil
}

func opWriteFile(s *Server, ch *Channel, raw []byte) (any, error) {
	var r fileReq
	if err := decode(raw, &r); err != nil {
		ch.closeIn()
		return nil, err
	}
	owner, err := s.fileOwner(r.User)
	if err != nil {
		ch.closeIn()
		return nil, err
	}
	path, err := s.reqPath("path", r.Path)
	if err != nil {
		ch.closeIn()
		return nil, err
	}
	resp, err := writeFile(ch, &r, path, owner)
	ch.closeIn()
	return resp, err
}

func writeFile(ch *Channel, r *fileReq, path string, owner *account) (any, error) {
	if strings.HasSuffix(path, "/") {
		return nil, errf("is_dir", "%s ends with /: it names a directory, not a file to write", path)
	}
	var mode *os.FileMode // nil: keep an existing file's mode, 0644 for a new one
	if r.Mode != nil {
		m, err := fileMode(r.Mode, 0)
		if err != nil {
			return nil, err
		}
		mode = &m
	}
	if r.Mkdirs == nil || *r.Mkdirs {
		if err := mkdirs(filepath.Dir(path), 0o755, owner); err != nil {
			return nil, err
		}
	}
	// From here on every error names the requested path, never the file a
	// link led to or the temporary file.
	target, st, magic, err := resolveTarget(path)
	if err != nil {
		return nil, pathErr("open", path, err)
	}
	if st != nil {
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			return nil, errf("is_dir", "%s is a directory", path)
		case syscall.S_IFSOCK:
			return nil, errf("invalid", "%s is a socket, not a regular file", path)
		}
	}
	var f *os.File
	tmp := ""
	created := false
	switch {
	case r.Append && st == nil:
		f, err = os.OpenFile(target, os.O_WRONLY|os.O_APPEND|os.O_CREATE|os.O_EXCL, 0o600)
		if created = err == nil; errors.Is(err, os.ErrExist) { // created meanwhile
			f, err = openInPlace(path, target, os.O_APPEND)
		}
	case r.Append || magic || writesInPlace(target, st):
		// a device, a FIFO or a kernel knob: replacing it would destroy it
		// (or fail, on procfs and friends), so it is written as it is
		flag := os.O_APPEND
		if !r.Append {
			flag = os.O_TRUNC
		}
		f, err = openInPlace(path, target, flag)
	default:
		// write beside the target and rename, so a failed write leaves the
		// old file intact. The name need not be unguessable (O_EXCL refuses
		// anything already there, a planted symlink included), so math/rand:
		// crypto/rand would add its FIPS self-checks to every boot.
		var rnd [6]byte
		for i := range rnd {
			rnd[i] = byte(rand.Uint32())
		}
		tmp = filepath.Join(filepath.Dir(target), tempName(filepath.Base(target), rnd[:]))
		f, err = os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	}
	if err != nil {
		return nil, pathErr("open", path, err)
	}
	if created {
		// appended to in place: its mode and owner are final before any byte, so
		// a write cut short leaves a file like the one asked for, not a 0600 root's
		if err := finishNew(f, mode, owner); err != nil {
			f.Close()
			return nil, pathErr("chmod", path, err)
		}
	}
	fail := func(err error) (any, error) {
		f.Close()
		if tmp != "" {
			os.Remove(tmp)
		}
		return nil, err
	}
	if tmp == "" {
		// a write to a FIFO or a terminal can block for good: CANCEL and a
		// lost connection interrupt it (where the file can be polled)
		defer ch.onAbort(func(aborted bool) {
			if aborted {
				_ = f.SetWriteDeadline(time.Unix(1, 0))
			}
		})()
	}
	var n int64
	for {
		b, eof, err := ch.readIn(ch.cancel)
		if err == errAborted {
			return fail(errf("io", "cancelled"))
		} else if err != nil {
			_, _ = fail(err)
			return nil, nil
		}
		if eof {
			break
		}
		if _, err := f.Write(b); err != nil {
			select {
			case <-ch.Done():
				_, _ = fail(err)
				return nil, nil
			case <-ch.cancel:
				return fail(errf("io", "cancelled"))
			default:
			}
			return fail(pathErr("write", path, err))
		}
		n += int64(len(b))
		ch.creditIn(len(b))
	}
	if tmp != "" && st != nil {
		// the replacement keeps the owner of the file it replaces (best
		// effort: only root may give a file away); before the chmod, which
		// a chown would strip of setuid/setgid
		if int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid() {
			_ = f.Chown(int(st.Uid), int(st.Gid))
		}
		if mode == nil {
			m, _ := fileMode(ptr(int64(st.Mode&0o7777)), 0)
			mode = &m
		}
	}
	if tmp != "" {
		if st != nil {
			owner = nil // a new file is the user's; one replaced keeps its owner (above)
		}
		if err := finishNew(f, mode, owner); err != nil {
			return fail(pathErr("chmod", path, err))
		}
	}
	if err := f.Close(); err != nil {
		return fail(pathErr("write", path, err))
	}
	if tmp != "" {
		if err := os.Rename(tmp, target); err != nil {
			os.Remove(tmp)
			return nil, pathErr("replace", path, err)
		}
	}
	return ok("bytes", n), nil
}

func ptr[T any](v T) *T { return &v }

// finishNew gives a file write_file made its owner (nil: as it is) and mode
// (nil: 0644), in that order: a chown strips setuid/setgid. Explicit chmod:
// the umask must not change the requested mode.
func finishNew(f *os.File, mode *os.FileMode, owner *account) error {
	if owner != nil {
		if err := f.Chown(int(owner.uid), int(owner.gid)); err != nil {
			return err
		}
	}
	m := os.FileMode(0o644)
	if mode != nil {
		m = *mode
	}
	return f.Chmod(m)
}

// underProc says whether path goes through /proc, whose links only the
// kernel follows right (see resolveTarget).
func underProc(path string) bool { return path == "/proc" || strings.HasPrefix(path, "/proc/") }

// resolveDir is dir without symlinks, or as it is if it goes through /proc.
func resolveDir(dir string) (string, error) {
	if underProc(dir) {
		return dir, nil
	}
	return filepath.EvalSymlinks(dir)
}

// maxSymlinks is the kernel's limit on links followed in one lookup.
const maxSymlinks = 40

// resolveTarget follows symlinks in the last component of path as open(2)
// does (the kernel follows those in its directories), so that write_file
// writes the file a link points to instead of replacing the link; a
// dangling link leads to the file it would create, unless its text ends in
// "/" (the kernel's EISDIR: a name with a slash is a directory's). It returns the path
// without symlinks and that file's stat, nil if nothing is there yet; magic
// says it is a procfs link, which must be opened where it is.
func resolveTarget(path string) (_ string, _ *syscall.Stat_t, magic bool, _ error) {
	if underProc(path) {
		// /proc/<pid>/root and /proc/<pid>/cwd are links whose text is not where
		// they lead (a container's root reads as "/"): only the kernel, opening
		// the path itself, follows them right, so an existing file there is
		// written in place and a new one made in the directory as named
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err == syscall.ENOENT {
			return path, nil, false, nil
		} else if err != nil {
			return "", nil, false, err
		}
		return path, &st, true, nil
	}
	target := path
	dirOnly := false // a link's text ended in "/": what it leads to must be a directory
	for hops := 0; ; hops++ {
		if hops > maxSymlinks {
			return "", nil, false, syscall.ELOOP
		}
		dir, err := filepath.EvalSymlinks(filepath.Dir(target))
		if err != nil {
			return "", nil, false, err
		}
		target = filepath.Join(dir, filepath.Base(target))
		var st syscall.Stat_t
		if err := syscall.Lstat(target, &st); err == syscall.ENOENT {
			if dirOnly {
				return "", nil, false, syscall.EISDIR
			}
			return target, nil, false, nil
		} else if err != nil {
			return "", nil, false, err
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFLNK {
			if dirOnly && st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
				return "", nil, false, syscall.ENOTDIR
			}
			return target, &st, false, nil
		}
		if onProcfs(dir) {
			// /proc/<pid>/fd/N and friends: "links" whose text is no path
			// (pipe:[123]) and that only open(2) itself can follow
			if err := syscall.Stat(target, &st); err != nil {
				return "", nil, false, err
			}
			return target, &st, true, nil
		}
		link, err := os.Readlink(target)
		if err != nil {
			return "", nil, false, err
		}
		dirOnly = dirOnly || strings.HasSuffix(link, "/")
		if !filepath.IsAbs(link) {
			link = filepath.Join(dir, link) // dir has no symlinks: ".." is lexical
		}
		target = filepath.Clean(link)
	}
}

const configfsMagic = 0x62656570 // not in x/sys/unix

// writesInPlace says whether write_file writes an existing file as it is
// instead of replacing it: anything but a regular file, and the files of
// the kernel's pseudo-filesystems, where a temporary file cannot be made
// and a rename would not reach the kernel.
func writesInPlace(target string, st *syscall.Stat_t) bool {
	if st == nil {
		return false
	}
	return st.Mode&syscall.S_IFMT != syscall.S_IFREG || onKernelFS(target) || isMountRoot(target)
}

// isMountRoot says whether path is mounted on (a file bind-mounted there, as
// containers do with /etc/hosts): rename(2) cannot replace it (EBUSY).
func isMountRoot(path string) bool {
	var stx unix.Statx_t
	err := unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx)
	return err == nil && stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 &&
		stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0
}

// onKernelFS says whether path is on one of the kernel's pseudo-filesystems,
// whose files are the kernel's knobs and views rather than stored data.
func onKernelFS(path string) bool {
	switch fsType(path) {
	case unix.PROC_SUPER_MAGIC, unix.SYSFS_MAGIC, unix.CGROUP2_SUPER_MAGIC,
		unix.CGROUP_SUPER_MAGIC, unix.DEBUGFS_MAGIC, unix.TRACEFS_MAGIC,
		unix.SECURITYFS_MAGIC, configfsMagic, unix.EFIVARFS_MAGIC,
		unix.PSTOREFS_MAGIC, unix.BINFMTFS_MAGIC, unix.SELINUX_MAGIC,
		unix.SMACK_MAGIC, unix.BPF_FS_MAGIC:
		return true
	}
	return false
}

func fsType(path string) uint32 {
	var fs unix.Statfs_t
	if unix.Statfs(path, &fs) != nil {
		return 0
	}
	return uint32(fs.Type)
}

func onProcfs(path string) bool { return fsType(path) == unix.PROC_SUPER_MAGIC }

// openInPlace opens an existing file to write it where it is (flag adds
// O_TRUNC or O_APPEND). It opens without blocking, so that a FIFO no one
// reads gives an error instead of an open(2) that waits forever, and without
// making a terminal the agent's controlling terminal. A pseudo-file that
// refuses truncation is opened again without O_TRUNC.
func openInPlace(path, target string, flag int) (*os.File, error) {
	const base = os.O_WRONLY | syscall.O_NONBLOCK | syscall.O_NOCTTY
	f, err := os.OpenFile(target, base|flag, 0)
	if flag&os.O_TRUNC != 0 && (errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EPERM) ||
		errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EOPNOTSUPP)) {
		f, err = os.OpenFile(target, base|flag&^os.O_TRUNC, 0)
	}
	if errors.Is(err, syscall.ENXIO) { // a write-only FIFO open without a reader
		if fi, serr := os.Stat(target); serr == nil && fi.Mode()&os.ModeNamedPipe != 0 {
			return nil, errf("invalid", "%s is a FIFO that no process reads", path)
		}
	}
	if err != nil {
		return nil, err
	}
	// A file the runtime cannot poll (a pseudo-file, most devices) would
	// now answer EAGAIN instead of blocking: give it back blocking writes.
	if f.SetWriteDeadline(time.Time{}) != nil {
		if rc, err := f.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) { _ = unix.SetNonblock(int(fd), false) })
		}
	}
	return f, nil
}

// pathErr names path, the one the host asked for, in an error about the file
// it resolved to, keeping the errno (and so the error code).
func pathErr(op, path string, err error) error {
	if _, ok := err.(*apiError); ok {
		return err
	}
	var pe *os.PathError
	var le *os.LinkError
	if errors.As(err, &pe) {
		err = pe.Err
	} else if errors.As(err, &le) {
		err = le.Err
	}
	return &os.PathError{Op: op, Path: path, Err: err}
}

// openFile opens path for read_file and returns its stat. Opening a FIFO
// blocks until its other end opens, which a guest process can withhold
// forever (and CANCEL cannot interrupt open(2)); so it opens without blocking
// and refuses FIFOs and sockets, which read_file cannot serve (pread on a
// pipe fails). (write_file's in-place writes open with openInPlace.)
func openFile(path string) (*os.File, *syscall.Stat_t, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	st := fi.Sys().(*syscall.Stat_t)
	kind := ""
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFIFO:
		kind = "FIFO"
	case syscall.S_IFSOCK:
		kind = "socket"
	}
	if kind != "" {
		f.Close()
		return nil, nil, errf("invalid", "%s is a %s, not a regular file", path, kind)
	}
	return f, st, nil
}

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
	e := map[string]any{"name": fi.Name(), "path": path, "type": t, "size": fi.Size(),
		"mtime_ns": unixNanoSaturated(fi.ModTime())}
	if st != nil {
		e["mode"], e["uid"], e["gid"] = st.Mode&0o7777, st.Uid, st.Gid
	}
	if t == "symlink" {
		if l, err := os.Readlink(path); err == nil {
			e["link"] = l
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
	return ok("entry", e), nil
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
	if err := l.walk(path, depth); err != nil {
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
		return nil // unrepresentable in one frame: skipped
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

func (l *lister) walk(dir string, depth int) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	for {
		ents, err := f.ReadDir(listBatch)
		if err := l.walkEntries(dir, ents, depth); err != nil {
			return err
		}
		if err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

func (l *lister) walkEntries(dir string, ents []os.DirEntry, depth int) error {
	for _, de := range ents {
		select {
		case <-l.ch.cancel:
			return errListCancelled
		default:
		}
		p := filepath.Join(dir, de.Name())
		fi, err := de.Info()
		if err != nil {
			continue // vanished meanwhile
		}
		if err := l.add(entry(p, fi)); err != nil {
			return err
		}
		if depth > 1 && fi.IsDir() {
			// an unreadable subdirectory is skipped; a cancel or a lost
			// connection ends the whole listing
			if err := l.walk(p, depth-1); err == errConnClosed || err == errListCancelled {
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
		if fi, err := os.Stat(path); err == nil {
			if !fi.IsDir() {
				return nil, errf("exists", "%s exists and is not a directory", path)
			}
			return ok(), nil // mkdir -p: an existing directory is left as it is
		}
		err = mkdirs(path, mode, owner)
	} else if err = os.Mkdir(path, mode); err == nil {
		if err = chmodNewDir(path, mode); err == nil {
			err = give(path, owner)
		}
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
		err = os.RemoveAll(path)
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
		Src string `json:"src"`
		Dst string `json:"dst"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	src, err := s.reqPath("src", r.Src)
	if err != nil {
		return nil, err
	}
	dst, err := s.reqPath("dst", r.Dst)
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

// decodePathReq decodes a file request and checks its "path" field.
func (s *Server) decodePathReq(raw []byte) (fileReq, string, error) {
	var r fileReq
	if err := decode(raw, &r); err != nil {
		return r, "", err
	}
	path, err := s.reqPath("path", r.Path)
	return r, path, err
}

// isTempName tells the names tempName makes (a watch does not report them).
func isTempName(name string) bool {
	i := strings.LastIndex(name, ".isorun-")
	if !strings.HasPrefix(name, ".") || i < 1 || len(name)-i != len(".isorun-")+12 {
		return false
	}
	_, err := hex.DecodeString(name[i+len(".isorun-"):])
	return err == nil
}

// tempName names the file a write goes to before it replaces base: base's
// name (cut short so that the whole stays within NAME_MAX, 255 bytes, even
// for the longest base), hidden, with a random suffix.
func tempName(base string, rnd []byte) string {
	const keep = 200 // + "." + ".isorun-" + 12 hex digits = 221
	if len(base) > keep {
		base = base[:keep]
	}
	return "." + base + ".isorun-" + hex.EncodeToString(rnd)
}

// readDevice reads at most k bytes of a device into the frame pb, in one
// read(2). A device of records refuses a buffer shorter than its next record
// (EINVAL, the record kept): it is read again into a whole frame, of which k
// bytes are kept. A stream device is never read past k.
func readDevice(f *os.File, pb *[]byte, k int) (int, error) {
	n, err := readRecord(f, (*pb)[headerSize:headerSize+k])
	if errors.Is(err, syscall.EINVAL) && k < MaxOutPayload {
		n, err = readRecord(f, (*pb)[headerSize:headerSize+MaxOutPayload])
		n = min(n, k)
	}
	return n, err
}

// readRecord is one read(2), its EAGAIN returned: os.File.Read of a pollable
// fd (a device opened non-blocking) would wait in the poller for more data,
// and a device of records that has no more never sends any.
func readRecord(f *os.File, b []byte) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), b)
		return true
	}); err != nil {
		return 0, err
	}
	if n < 0 {
		n = 0
	}
	if n == 0 && rerr == nil && len(b) > 0 {
		rerr = io.EOF
	}
	return n, rerr
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
