package agent

import (
	"encoding/json"
	"sort"
	"strconv"
	"syscall"
	"time"
	"unicode/utf8"
)

// Each op has its own struct so unknown fields are rejected per op.
type procReq struct {
	Op     string `json:"op"`
	ProcID string `json:"proc_id"`
}

type attachReq struct {
	procReq
	Offset int64 `json:"offset"`
	Output *bool `json:"output"`
	Stdin  bool  `json:"stdin"`
}

type signalReq struct {
	procReq
	Signal int `json:"signal"`
}

type killReq struct {
	procReq
	GraceMs *int64 `json:"grace_ms"`
}

type resizeReq struct {
	procReq
	Rows int `json:"rows"`
	Cols int `json:"cols"`
}

type hasProcID interface{ procID() string }

func (r *procReq) procID() string { return r.ProcID }

func (s *Server) proc(raw []byte, r hasProcID) (*Proc, error) {
	if err := decode(raw, r); err != nil {
		return nil, err
	}
	p := s.Procs.Get(r.procID())
	if p == nil {
		return nil, errf("not_found", "no process %q", r.procID())
	}
	return p, nil
}

func opAttach(s *Server, ch *Channel, raw []byte) (any, error) {
	var r attachReq
	p, err := s.proc(raw, &r)
	if err != nil {
		return nil, err
	}
	if r.Offset < 0 {
		return nil, errf("invalid", "offset must be >= 0")
	}
	if r.Stdin && !p.takesStdin() {
		// else what the host sends would be credited and dropped unread
		return nil, errf("invalid", "process %s takes no stdin: it was started without "+
			"stdin, or its stdin was closed", p.ID)
	}
	start, _ := p.ring.Bounds()
	ev := map[string]any{"event": "attached", "offset": max(r.Offset, start)}
	if r.Offset < start {
		ev["lost"] = start - r.Offset
	}
	if err := ch.Event(ev); err != nil {
		return nil, nil
	}
	if r.Stdin {
		// The stdin pump ends with the attachment (CANCEL, the RESP) or
		// the process, whichever comes first.
		abort, stop := make(chan struct{}), make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-p.exited:
			case <-ch.cancel:
			case <-stop:
			}
			close(abort)
		}()
		go pumpStdin(ch, p, abort)
	} else {
		ch.closeIn()
	}
	if r.Output == nil || *r.Output {
		cur := p.ring.Cursor(max(r.Offset, start), false)
		defer ch.onAbort(func(bool) { p.detachCursor(cur) })()
		if err := streamOutput(ch, p, cur, ch.cancel); err != nil {
			return detached(ch, p)
		}
	}
	// The result follows the whole output, as for a foreground exec: output
	// a grandchild writes after the exit is drained into the ring first.
	for _, end := range []<-chan struct{}{p.ring.Done(), p.exited} {
		select {
		case <-end:
		case <-ch.cancel:
			return detached(ch, p)
		case <-ch.Done():
			return nil, nil
		}
	}
	return p.result(), nil
}

// detached answers an attach the host cancelled; the process goes on. One
// that has already ended has nothing to detach from: the host gets its
// result (a cancel racing the end, or a spent window, must not lose it).
func detached(ch *Channel, p *Proc) (any, error) {
	select {
	case <-ch.Done():
		return nil, nil
	default:
	}
	if p.ended() {
		return p.result(), nil
	}
	return ok("proc_id", p.ID, "detached", true), nil
}

func opSignal(s *Server, ch *Channel, raw []byte) (any, error) {
	var r signalReq
	p, err := s.proc(raw, &r)
	if err != nil {
		return nil, err
	}
	if r.Signal < 1 || r.Signal > 64 {
		return nil, errf("invalid", "signal must be 1..64")
	}
	if err := p.Signal(syscall.Signal(r.Signal)); err != nil {
		return nil, err
	}
	if p.PTY {
		// as the key would: to the job in the terminal's foreground too (an
		// interactive shell runs it in a group of its own, which SIGINT to
		// the shell's group does not reach)
		if fg := p.foregroundGroup(); fg > 0 && fg != p.Pid {
			_ = syscall.Kill(-fg, syscall.Signal(r.Signal))
		}
	}
	return ok(), nil
}

func opKill(s *Server, ch *Channel, raw []byte) (any, error) {
	var r killReq
	p, err := s.proc(raw, &r)
	if err != nil {
		return nil, err
	}
	grace := int64(2000)
	if r.GraceMs != nil {
		grace = *r.GraceMs
	}
	if grace < 0 || grace > 3600_000 {
		return nil, errf("invalid", "grace_ms out of range")
	}
	p.Terminate(time.Duration(grace) * time.Millisecond)
	select {
	case <-p.exited:
	case <-ch.cancel:
		return nil, errf("io", "cancelled")
	case <-ch.Done():
		return nil, nil
	}
	code, sig := p.exitStatus()
	return ok("exit_code", code, "signal", sig), nil
}

func opResize(s *Server, ch *Channel, raw []byte) (any, error) {
	var r resizeReq
	p, err := s.proc(raw, &r)
	if err != nil {
		return nil, err
	}
	if !p.PTY {
		return nil, errf("invalid", "process %s has no PTY", p.ID)
	}
	ws, err := winsize(&ptyReq{Rows: r.Rows, Cols: r.Cols})
	if err != nil {
		return nil, err
	}
	// A process that has exited, or whose terminal is gone (pty nil once
	// the master is closed), has nothing to resize: ok, as for a no-op.
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.pty != nil && !p.Exited() {
		if err := setWinsize(p.pty, ws); err != nil {
			return nil, err
		}
	}
	return ok(), nil
}

func opCloseStdin(s *Server, ch *Channel, raw []byte) (any, error) {
	var r procReq
	p, err := s.proc(raw, &r)
	if err != nil {
		return nil, err
	}
	p.CloseStdin()
	return ok(), nil
}

// A listing shows at most this much of a process's argv (each argument counted
// with its JSON quotes and comma): a long script passed as `cmd` must not keep
// its process's entry from fitting a frame (escaped, 2 KiB is at most 12 KiB;
// with a tag of 1 KiB escaped, an entry stays well under MaxOutPayload).
const listedArgvBytes = 2048

// cutText is s cut to at most n bytes, on a character boundary.
func cutText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// listedArgv is argv cut to listedArgvBytes, on a character boundary, and
// whether anything was cut.
func listedArgv(argv []string) ([]string, bool) {
	out := make([]string, 0, len(argv))
	left := listedArgvBytes
	for _, a := range argv {
		if left <= 3 {
			return out, true
		}
		left -= 3
		if len(a) > left {
			return append(out, cutText(a, left)), true
		}
		left -= len(a)
		out = append(out, a)
	}
	return out, false
}

func opListProcs(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op string `json:"op"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	ps := s.Procs.All()
	sort.Slice(ps, func(i, j int) bool {
		a, _ := strconv.Atoi(ps[i].ID[1:])
		b, _ := strconv.Atoi(ps[j].ID[1:])
		return a < b
	})
	// One JSON payload must fit one frame: long listings go out as
	// EVENT {"event":"procs","procs":[...]} batches before the RESP.
	var batch []json.RawMessage
	size := 0
	for _, p := range ps {
		code, sig := p.exitStatus()
		argv, cut := listedArgv(p.Argv)
		b, _ := json.Marshal(map[string]any{"proc_id": p.ID, "pid": p.Pid, "argv": argv,
			"argv_truncated": cut, "tag": p.Tag, "pty": p.PTY, "running": !p.Exited(), "exit_code": code,
			"signal": sig, "started_unix_ms": p.StartedAt.UnixMilli(),
			"output_bytes": func() int64 { _, e := p.ring.Bounds(); return e }()})
		if size+len(b)+1 > MaxOutPayload-64 {
			if err := ch.Event(map[string]any{"event": "procs", "procs": batch}); err != nil {
				return nil, nil
			}
			batch, size = nil, 0
		}
		batch = append(batch, b)
		size += len(b) + 1
	}
	if batch == nil {
		batch = []json.RawMessage{}
	}
	return ok("procs", batch), nil
}

type defaultsReq struct {
	Op   string            `json:"op"`
	Env  map[string]string `json:"env"`
	Cwd  *fsName           `json:"cwd"`
	User json.RawMessage   `json:"user"`
}

func opSetDefaults(s *Server, ch *Channel, raw []byte) (any, error) {
	var r defaultsReq
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if err := validEnv(r.Env); err != nil {
		return nil, err
	}
	user, err := userString(r.User)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Env != nil {
		s.defEnv = r.Env
	}
	if r.Cwd != nil {
		s.defCwd = string(*r.Cwd)
	}
	if r.User != nil {
		s.defUser = user
	}
	return ok(), nil
}
