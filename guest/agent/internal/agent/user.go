package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// account is a resolved exec user (from the image's /etc/passwd, /etc/group).
type account struct {
	uid, gid uint32
	name     string
	home     string
	groups   []uint32
}

const maxAccountFile = 4 << 20

// scanColon calls fn with the colon-separated fields of each line of path.
// A missing file is not an error (distroless images).
func scanColon(path string, fn func(f []string) bool) error {
	// Without waiting, and only a regular file: guest root may make the
	// image's /etc/passwd a FIFO, whose open would wait for a writer for good.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return err
	} else if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	sc := bufio.NewScanner(io.LimitReader(f, maxAccountFile))
	sc.Buffer(make([]byte, 4096), 64<<10)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if !fn(strings.Split(line, ":")) {
			break
		}
	}
	return sc.Err()
}

func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err == nil
}

// lookupAccount resolves "user", "uid", "user:group" or "uid:gid".
func lookupAccount(spec string) (*account, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" {
		return nil, fmt.Errorf("empty user")
	}
	a := &account{home: "/"}
	uid, numeric := parseID(userPart)
	found := false
	err := scanColon("/etc/passwd", func(f []string) bool {
		if len(f) < 7 {
			return true
		}
		id, ok := parseID(f[2])
		if !ok || (f[0] != userPart && !(numeric && id == uid)) {
			return true
		}
		gid, _ := parseID(f[3])
		a.uid, a.gid, a.name, a.home, found = id, gid, f[0], f[5], true
		return false
	})
	if err != nil {
		return nil, err
	}
	if !found {
		if !numeric {
			return nil, fmt.Errorf("unknown user %q", userPart)
		}
		a.uid, a.gid = uid, 0
	}
	if hasGroup {
		gid, ok := parseID(groupPart)
		if !ok {
			gfound := false
			if err := scanColon("/etc/group", func(f []string) bool {
				if len(f) >= 3 && f[0] == groupPart {
					gid, gfound = 0, true
					if n, ok := parseID(f[2]); ok {
						gid = n
					}
					return false
				}
				return true
			}); err != nil {
				return nil, err
			}
			if !gfound {
				return nil, fmt.Errorf("unknown group %q", groupPart)
			}
		}
		a.gid = gid
	}
	a.groups = []uint32{a.gid}
	if a.name != "" {
		err = scanColon("/etc/group", func(f []string) bool {
			if len(f) < 4 {
				return true
			}
			gid, ok := parseID(f[2])
			if !ok || gid == a.gid {
				return true
			}
			for _, m := range strings.Split(f[3], ",") {
				if m == a.name {
					a.groups = append(a.groups, gid)
					break
				}
			}
			return true
		})
	}
	return a, err
}

// searchableBy reports whether the user of cred may enter dir: search (x)
// permission on it and every directory above it, by owner, group or other
// bits (ACLs aside). Used only to say why an exec failed with EACCES: the
// child changes to the user before its chdir, so the error alone blames the
// program.
func searchableBy(dir string, cred *syscall.Credential) bool {
	if cred == nil || cred.Uid == 0 {
		return true
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return true // not the reason we are looking for
	}
	inGroup := func(gid uint32) bool {
		return gid == cred.Gid || slices.Contains(cred.Groups, gid)
	}
	for d := real; ; d = filepath.Dir(d) {
		var st syscall.Stat_t
		if syscall.Stat(d, &st) != nil {
			return true
		}
		bit := uint32(0o001)
		if st.Uid == cred.Uid {
			bit = 0o100
		} else if inGroup(st.Gid) {
			bit = 0o010
		}
		if st.Mode&bit == 0 {
			return false
		}
		if d == "/" || d == "." {
			return true
		}
	}
}

// uidOfUser is the uid of a user spec, 0 for "" (root) or one that does not resolve.
func uidOfUser(spec string) uint32 {
	if spec == "" {
		return 0
	}
	a, err := lookupAccount(spec)
	if err != nil {
		return 0
	}
	return a.uid
}
