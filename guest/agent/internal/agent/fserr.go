package agent

import (
	"errors"
	"path/filepath"
	"strings"
	"syscall"
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
// kept: as for the kernel, "f/" names a directory, so a stat, read or remove
// of a file through it fails not_dir instead of reaching the file.
func (s *Server) reqPath(field, p string) (string, error) {
	if p == "" || strings.IndexByte(p, 0) >= 0 {
		return "", errf("invalid", "%s must be a path (absolute, or relative to the working directory) without NUL bytes", field)
	}
	dir := strings.HasSuffix(p, "/")
	if !filepath.IsAbs(p) {
		p = filepath.Join(s.workDir(), p)
	}
	clean := filepath.Clean(p)
	if dir && clean != "/" {
		clean += "/"
	}
	return clean, nil
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
