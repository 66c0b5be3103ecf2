package agent

import (
	"encoding/json"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// fileOwner is who the files API's new files and directories belong to: the
// request's `user`, else the sandbox's default user (the image's USER), so
// that user's commands can change what the host wrote for them. nil: root,
// as created. The API itself acts with root's rights (the sandbox is its
// user's whole machine); only ownership follows the user.
func (s *Server) fileOwner(raw json.RawMessage) (*account, error) {
	spec, err := userString(raw)
	if err != nil {
		return nil, err
	}
	asked := spec != ""
	if !asked {
		s.mu.Lock()
		spec = s.defUser
		s.mu.Unlock()
	}
	if spec == "" || spec == "root" || spec == "0" || spec == "0:0" {
		return nil, nil // root's, as created: no need to read /etc/passwd for every write
	}
	a, err := lookupAccount(spec)
	if err != nil {
		if !asked {
			// an image whose USER its /etc/passwd lacks: its execs fail and say
			// so; its files are root's rather than every write failing
			return nil, nil
		}
		return nil, errf("invalid", "user %s: %v", spec, err)
	}
	if a.uid == 0 && a.gid == 0 {
		return nil, nil
	}
	return a, nil
}

// give makes what the files API just created owner's (nil: left as it is).
func give(path string, owner *account) error {
	if owner == nil {
		return nil
	}
	return os.Lchown(path, int(owner.uid), newFileGid(path, owner))
}

// newFileGid is the group for owner's new file at path: its own, except in a
// setgid directory (a tree shared by a group), where the file keeps the
// directory's group the kernel gave it (-1: unchanged), as it would have had
// owner made it.
func newFileGid(path string, owner *account) int {
	var st unix.Stat_t
	if unix.Stat(filepath.Dir(path), &st) == nil && st.Mode&unix.S_ISGID != 0 {
		return -1
	}
	return int(owner.gid)
}

// mkdirs creates dir and the directories missing above it, each 0755 but
// dir itself leafMode (as mkdir -p -m; os.MkdirAll would give every parent
// leafMode), each owner's. What exists is left as it is.
func mkdirs(dir string, leafMode os.FileMode, owner *account) error {
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break // a file in the way is the caller's to report
		} else if !os.IsNotExist(err) || d == "/" {
			return err
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		d, mode := missing[i], os.FileMode(0o755)
		if i == 0 {
			mode = leafMode
		}
		if err := os.Mkdir(d, mode); os.IsExist(err) {
			// made meanwhile by someone else (theirs), unless it is no directory:
			// a file, or a dangling symlink os.Stat took for nothing there
			if fi, serr := os.Stat(d); serr != nil || !fi.IsDir() {
				return err
			}
			continue
		} else if err != nil {
			return err
		}
		if err := chmodNewDir(d, mode); err != nil {
			return err
		}
		if err := give(d, owner); err != nil {
			return err
		}
	}
	return nil
}

// chmodNewDir gives a directory just made its mode: explicitly, as the umask
// must not change it, and keeping a setgid bit it took from its parent (a
// shared group's tree).
func chmodNewDir(d string, mode os.FileMode) error {
	if fi, err := os.Stat(d); err == nil {
		mode |= fi.Mode() & os.ModeSetgid
	}
	return os.Chmod(d, mode)
}
