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
		if err := settleNewDir(d, mode, owner); err != nil {
			return err
		}
	}
	return nil
}

// settleNewDir gives a directory just made its mode (explicitly, as the umask
// must not change it, keeping a setgid bit it took from its parent: a shared
// group's tree) and its owner. Through an fd opened without following a link:
// a guest process owning the parent could swap the new directory for a link
// between mkdir(2) and a chmod by path, and root's chmod would then reach the
// link's target (a reviewer made /etc/shadow's stand-in mode 777 that way).
func settleNewDir(d string, mode os.FileMode, owner *account) error {
	fd, err := unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: d, Err: err} // swapped meanwhile: not ours
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &os.PathError{Op: "stat", Path: d, Err: err}
	}
	perm := uint32(mode.Perm()) | st.Mode&unix.S_ISGID
	for bit, sys := range map[os.FileMode]uint32{
		os.ModeSetuid: unix.S_ISUID, os.ModeSetgid: unix.S_ISGID, os.ModeSticky: unix.S_ISVTX,
	} {
		if mode&bit != 0 {
			perm |= sys
		}
	}
	if err := unix.Fchmod(fd, perm); err != nil {
		return &os.PathError{Op: "chmod", Path: d, Err: err}
	}
	if owner == nil {
		return nil
	}
	gid := int(owner.gid)
	if st.Mode&unix.S_ISGID != 0 {
		gid = -1 // the directory's group, as the kernel gave it in a setgid parent
	}
	if err := unix.Fchown(fd, int(owner.uid), gid); err != nil {
		return &os.PathError{Op: "chown", Path: d, Err: err}
	}
	return nil
}
