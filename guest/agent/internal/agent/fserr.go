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

// absPath validates a request path: absolute, no NUL, cleaned. A trailing
// slash is kept: as for the kernel, "f/" names a directory, so a stat, read
// or remove of a file through it fails not_dir instead of reaching the file.
func absPath(field, p string) (string, error) {
	if p == "" || !filepath.IsAbs(p) || strings.IndexByte(p, 0) >= 0 {
		return "", errf("invalid", "%s must be an absolute path", field)
	}
	clean := filepath.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return clean, nil
}
