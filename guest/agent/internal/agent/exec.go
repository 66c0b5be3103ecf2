package agent

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

type ptyReq struct {
	Rows int `json:"rows"`
	Cols int `json:"cols"`
}

type execReq struct {
	Op         string            `json:"op"`
	Cmd        *string           `json:"cmd"`
	Argv       []string          `json:"argv"`
	Env        map[string]string `json:"env"`
	Cwd        fsName            `json:"cwd"`
	User       json.RawMessage   `json:"user"`
	TimeoutMs  int64             `json:"timeout_ms"`
	Stdin      bool              `json:"stdin"`
	Background bool              `json:"background"`
	Pty        *ptyReq           `json:"pty"`
	Tag        string            `json:"tag"`
	RingBytes  *int64            `json:"ring_bytes"`
}

// userString accepts "name", "uid" or a JSON number.
func userString(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var n uint32
	if json.Unmarshal(raw, &n) == nil {
		return strconv.FormatUint(uint64(n), 10), nil
	}
	return "", errf("invalid", "user must be a name or uid")
}

func validEnv(env map[string]string) error {
	for k, v := range env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
			return errf("invalid", "bad env name or value %q", k)
		}
	}
	return nil
}

func winsize(p *ptyReq) (*unix.Winsize, error) {
	rows, cols := p.Rows, p.Cols
	if rows == 0 {
		rows = 24
	}
	if cols == 0 {
		cols = 80
	}
	if rows < 1 || rows > 65535 || cols < 1 || cols > 65535 {
		return nil, errf("invalid", "pty rows/cols out of range")
	}
	return &unix.Winsize{Row: uint16(rows), Col: uint16(cols)}, nil
}

// buildSpec validates an exec request and resolves program, env, user.
func (s *Server) buildSpec(r *execReq) (*spawnSpec, error) {
	if (r.Cmd == nil) == (len(r.Argv) == 0) {
		return nil, errf("invalid", "exactly one of cmd or argv is required")
	}
	for _, a := range r.Argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, errf("invalid", "argv contains a NUL byte")
		}
	}
	if r.Cmd != nil && strings.IndexByte(*r.Cmd, 0) >= 0 {
		return nil, errf("invalid", "cmd contains a NUL byte")
	}
	if err := validEnv(r.Env); err != nil {
		return nil, err
	}
	if r.TimeoutMs < 0 || r.TimeoutMs > maxTimeoutMs {
		return nil, errf("invalid", "timeout_ms must be between 0 and %d", maxTimeoutMs)
	}
	if len(r.Tag) > 1024 {
		return nil, errf("invalid", "tag longer than 1024 bytes")
	}
	userSpec, err := userString(r.User)
	if err != nil {
		return nil, err
	}
	sp := &spawnSpec{stdin: r.Stdin, tag: r.Tag, ring: defaultRing,
		timeout: time.Duration(r.TimeoutMs) * time.Millisecond}
	if r.RingBytes != nil {
		if *r.RingBytes <= 0 {
			return nil, errf("invalid", "ring_bytes must be > 0")
		}
		sp.ring = min(*r.RingBytes, maxRing)
	}
	if r.Pty != nil {
		if sp.pty, err = winsize(r.Pty); err != nil {
			return nil, err
		}
	}
	if r.Cmd != nil {
		sp.argv = []string{"/bin/sh", "-c", *r.Cmd}
		if strings.HasPrefix(*r.Cmd, "-") || strings.HasPrefix(*r.Cmd, "+") {
			// else sh takes "-x" for its own option and runs nothing
			sp.argv = []string{"/bin/sh", "-c", "--", *r.Cmd}
		}
	} else {
		sp.argv = append([]string(nil), r.Argv...)
	}

	s.mu.Lock()
	defEnv, cwd, defUser := s.defEnv, s.defCwd, s.defUser
	s.mu.Unlock()
	asked := userSpec
	if userSpec == "" {
		userSpec = defUser
	}
	if r.Cwd != "" {
		base := cwd // the default, read above
		if base == "" {
			base = "/"
		}
		cwd = string(r.Cwd)
		if !filepath.IsAbs(cwd) { // from the working directory
			cwd = base + "/" + cwd // not Join: it would take "link/.." as text
		}
		// "link/.." where the kernel's chdir goes (as the files API takes paths), so
		// what is joined to it later (a relative program) is found there too
		clean, err := cleanPath(cwd)
		if err != nil {
			sp.failCode, sp.failMsg = 127, "cwd "+string(r.Cwd)+": "+errnoText(err)
			return sp, nil
		}
		cwd = clean
	}
	if cwd == "" {
		cwd = "/"
	}

	env := map[string]string{"PATH": defaultPath, "HOME": "/root"}
	if sp.pty != nil {
		env["TERM"] = "xterm"
	}
	home, otherUser := "", false
	if userSpec != "" {
		a, err := lookupAccount(userSpec)
		if err != nil {
			sp.failCode, sp.failMsg = 127, "user "+userSpec+": "+err.Error()
			return sp, nil
		}
		sp.cred = &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: a.groups}
		if asked != "" {
			// another account than the sandbox's own (compared by uid: "0" is
			// "root"): the defaults' HOME is not theirs
			otherUser = a.uid != uidOfUser(defUser)
		}
		home = a.home
		env["HOME"] = a.home
		if a.name != "" {
			env["USER"], env["LOGNAME"] = a.name, a.name
		}
	}
	for k, v := range defEnv {
		if k != "HOME" || !otherUser {
			env[k] = v
		}
	}
	for k, v := range r.Env {
		env[k] = v
	}
	if r.Cwd == "" && !searchableBy(cwd, sp.cred) {
		// The default cwd (the image's WORKDIR, often /root) is closed to this
		// user: start in their home, or /, rather than fail every command.
		cwd = "/"
		if fi, err := os.Stat(home); err == nil && fi.IsDir() && searchableBy(home, sp.cred) {
			cwd = home
		}
	}
	sp.dir = cwd
	sp.env = make([]string, 0, len(env))
	for k, v := range env {
		sp.env = append(sp.env, k+"="+v)
	}
	sort.Strings(sp.env)
	// Checked here because a failed chdir in the child comes back as a bare
	// errno, which would be reported against the program ("true: no such
	// file or directory").
	if fi, err := os.Stat(cwd); err != nil {
		sp.failCode, sp.failMsg = 127, "cwd "+cwd+": "+errnoText(err)
		return sp, nil
	} else if !fi.IsDir() {
		sp.failCode, sp.failMsg = 127, "cwd "+cwd+": not a directory"
		return sp, nil
	}
	sp.path, sp.failCode, sp.failMsg = lookPath(sp.argv[0], env["PATH"], cwd)
	return sp, nil
}

// errnoText is an OS error without the op and path *PathError repeats.
func errnoText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// lookPath resolves prog like execvp, but in our own code so a missing
// program becomes exit 127 (126: found but not executable).
func lookPath(prog, path, cwd string) (string, int, string) {
	if prog == "" {
		return "", 127, "empty program name"
	}
	check := func(p string) int {
		fi, err := os.Stat(p)
		switch {
		case err != nil:
			return 127
		case fi.IsDir() || fi.Mode()&0o111 == 0:
			return 126
		}
		return 0
	}
	if strings.Contains(prog, "/") {
		p := prog
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		switch check(p) {
		case 0:
			return prog, 0, ""
		case 126:
			return "", 126, prog + ": permission denied"
		}
		return "", 127, prog + ": not found"
	}
	code := 127
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		if !filepath.IsAbs(dir) { // as execvp in the command's cwd would see it
			dir = filepath.Join(cwd, dir)
		}
		p := filepath.Join(dir, prog)
		switch check(p) {
		case 0:
			return p, 0, ""
		case 126:
			code = 126
		}
	}
	if code == 126 {
		return "", 126, prog + ": permission denied"
	}
	return "", 127, prog + ": not found"
}

func opExec(s *Server, ch *Channel, raw []byte) (any, error) {
	var r execReq
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	sp, err := s.buildSpec(&r)
	if err != nil {
		return nil, err
	}
	p, cur, err := s.Procs.Start(sp, !r.Background)
	if err == errBusy {
		return nil, errf("busy", "%v", err)
	} else if err != nil {
		return nil, err
	}
	if r.Background {
		ch.closeIn()
		return ok("proc_id", p.ID, "pid", p.Pid), nil
	}
	_ = ch.Event(map[string]any{"event": "started", "proc_id": p.ID, "pid": p.Pid})
	if r.Stdin {
		go pumpStdin(ch, p, p.exited)
	} else {
		ch.closeIn()
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for cancel := ch.cancel; ; {
			select {
			case <-cancel:
				p.Terminate(killGraceSecs)
				// The host forgot the channel at its CANCEL and credits nothing
				// more: its output is not held back for it (the process's pump
				// would wait on this cursor for good, and the ring never free).
				p.detachCursor(cur)
				cancel = nil
			case <-ch.Done():
				p.detachCursor(cur)
				return
			case <-stop:
				p.detachCursor(cur)
				return
			}
		}
	}()
	if err := streamOutput(ch, p, cur, ch.cancel); err != nil {
		select {
		case <-ch.Done():
			return nil, nil // connection gone: the process goes on, output to its ring
		default: // cancelled: answered once the process is gone, as any request
		}
	}
	select {
	case <-p.exited:
	case <-ch.Done():
		return nil, nil
	}
	return p.result(), nil
}

// pumpStdin feeds IN frames of ch to p's stdin, crediting the host as bytes
// are handed to the process; EOF closes stdin.
func pumpStdin(ch *Channel, p *Proc, abort <-chan struct{}) {
	for {
		b, eof, err := ch.readIn(abort)
		if err != nil {
			return
		}
		if eof {
			p.CloseStdin()
			return
		}
		p.WriteStdin(b)
		ch.creditIn(len(b))
	}
}

// streamOutput sends ring output from cur as OUT/ERR frames until the
// output ends (nil), or the channel is aborted.
func streamOutput(ch *Channel, p *Proc, cur *Cursor, abort <-chan struct{}) error {
	for {
		k, err := ch.acquire(MaxOutPayload, abort)
		if err != nil {
			return err
		}
		pb, buf := newDataFrame(k)
		n, stream, lost, err := p.ring.Next(cur, buf[headerSize:])
		ch.addCredit(int64(k - n))
		if n == 0 {
			framePool.Put(pb)
		}
		switch {
		case err == io.EOF:
			return nil
		case err != nil:
			return err
		case lost > 0:
			if err := ch.Event(map[string]any{"event": "gap", "lost": lost}); err != nil {
				return err
			}
		default:
			if err := ch.sendData(stream, pb, buf[:headerSize+n]); err != nil {
				return err
			}
		}
	}
}
