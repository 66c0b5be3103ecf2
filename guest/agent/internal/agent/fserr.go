package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// fsCode maps an OS error to a protocol error code.
func fsCode(err error) string {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return "io"
	}
	switch errno {
	case syscall.ENOENT:
		return "not_found"
	case syscall.EEXIST:
		return "exists"
	case syscall.EACCES, syscall.EPERM, syscall.EROFS:
		return "permission"
	case syscall.ENOTDIR:
		return "not_dir"
	case syscall.EISDIR:
		return "is_dir"
	case syscall.ENOTEMPTY:
		return "not_empty"
	case syscall.EINVAL, syscall.ENAMETOOLONG:
		return "invalid"
	case syscall.EBUSY:
		return "busy"
	case syscall.ENOSPC, syscall.EDQUOT:
		return "no_space"
	case syscall.EXDEV:
		return "cross_device"
	}
	return "io"
}

// reqPath validates a request path: no NUL, cleaned, and a relative one
// taken from the sandbox's working directory, where exec runs a command (so
// files.write("notes.txt") is what `cat notes.txt` reads). A trailing slash is
// kept: as for the kernel, "f/" (and "f/.") names a directory, so a stat, read
// or remove of a file through it fails not_dir instead of reaching the file.
func (s *Server) reqPath(field, p string) (string, error) {
	if p == "" || strings.IndexByte(p, 0) >= 0 {
		return "", errf("invalid", "%s must be a path (absolute, or relative to the working directory) without NUL bytes", field)
	}
	dir := strings.HasSuffix(p, "/") || strings.HasSuffix(p, "/.")
	if !filepath.IsAbs(p) {
		p = s.workDir() + "/" + p // not Join: it would clean ".." as text
	}
	clean, err := cleanPath(p)
	if err != nil {
		return "", &os.PathError{Op: "lookup", Path: p, Err: err}
	}
	if dir && clean != "/" {
		clean += "/"
	}
	return clean, nil
}

// cleanPath is p without "." and ".." that names the file the kernel finds
// at p. filepath.Clean drops "link/.." as text, where the kernel goes to the
// parent of the link's target: the two name different files.
func cleanPath(p string) (string, error) {
	if !strings.Contains(p+"/", "/../") { // p is absolute
		return filepath.Clean(p), nil
	}
	cur := "/"
	for _, name := range strings.Split(p, "/") {
		switch name {
		case "", ".":
		case "..":
			up, err := parentDir(cur)
			if err != nil {
				return "", err
			}
			cur = up
		default:
			cur = filepath.Join(cur, name)
		}
	}
	return cur, nil
}

// parentDir is where the kernel takes "dir/..". Only a symlink's differs
// from dir's text without its last name; that of a name not there yet is
// taken as text too (write_file and mkdir may make it a directory).
func parentDir(dir string) (string, error) {
	var st unix.Stat_t
	switch err := unix.Lstat(dir, &st); {
	case err == unix.ENOENT:
		return filepath.Dir(dir), nil
	case err != nil:
		return "", err
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return filepath.Dir(dir), nil
	case st.Mode&unix.S_IFMT != unix.S_IFLNK:
		return "", unix.ENOTDIR
	}
	// the kernel's own walk, read back: right for /proc's links too, whose
	// text is not where they lead
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err // a dangling link included: where it leads is not made
	}
	defer unix.Close(fd)
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return "", err
	}
	return filepath.Dir(real), nil
}

// workDir is the working directory of a command run without a cwd of its own.
func (s *Server) workDir() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.defCwd == "" {
		return "/"
	}
	return s.defCwd
}
