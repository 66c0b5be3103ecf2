package agent

import (
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// write_file: where a write lands (links followed as open(2) does, procfs and
// kernel filesystems written in place) and how a regular file is replaced
// whole (a temporary file renamed over it).

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
	path, err := s.reqPath("path", string(r.Path))
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
		// always: the temporary file's group is not always the agent's (in a
		// setgid directory it is the directory's)
		_ = f.Chown(int(st.Uid), int(st.Gid))
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
		if err := f.Chown(int(owner.uid), newFileGid(f.Name(), owner)); err != nil {
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
		// the path itself, follows them right, so the file is named as given.
		// A stored regular file reached through such a link is replaced like any
		// other (a temporary file made, and renamed, through the same link);
		// what procfs itself holds (a knob, /proc/<pid>/fd/N) and what a link
		// at the end leads to are written in place.
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err == syscall.ENOENT {
			return path, nil, false, nil
		} else if err != nil {
			return "", nil, false, err
		}
		var own syscall.Stat_t
		replaced := syscall.Lstat(path, &own) == nil && own.Mode&syscall.S_IFMT == syscall.S_IFREG &&
			!onProcfs(filepath.Dir(path))
		return path, &st, !replaced, nil
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
			link = dir + "/" + link // not Join: "sub/.." is the parent of sub's target
		}
		if target, err = cleanPath(link); err != nil {
			return "", nil, false, err
		}
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
