package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"time"
	"unicode/utf8"
)

// Version is the agent version reported by hello and health.
var Version = "0.1.0"

// Server holds state shared by all connections: processes and defaults.
type Server struct {
	Start     time.Time
	Procs     *ProcTable
	RootError string
	// Boot times the guest's boot steps for hello (nil outside PID 1).
	Boot *bootClock
	// ready is closed once requests may run (see HoldRequests).
	ready chan struct{}
	// Log receives console messages (nil: discarded).
	Log io.Writer
	// Shutdown powers off or reboots (PID 1 only; nil means unsupported).
	Shutdown func(mode string)
	// vsockKey: what a vsock host must present (vsockkey.go).
	vsockKey vsockKey
	logOnce  sync.Once
	logq     *logQueue

	mu sync.Mutex
	// rootTaken: a root filesystem was set up (or tried) once; there is no second.
	rootTaken bool
	// shuttingDown: the mode of the shutdown under way ("": none)
	shuttingDown string
	defEnv       map[string]string
	defCwd       string
	defUser      string
}

// NewServer returns a server whose uptime counts from start.
func NewServer(start time.Time) *Server {
	ready := make(chan struct{})
	close(ready)
	return &Server{Start: start, Procs: NewProcTable(), ready: ready}
}

// HoldRequests makes every request, hello included, wait until the returned
// function is called: the agent reads from the host while the guest is still
// being set up but answers only once it is. Call it before serving.
func (s *Server) HoldRequests() (release func()) {
	ch := make(chan struct{})
	s.ready = ch
	return func() { close(ch) }
}

// flushLog waits, at most d, for the console lines logged so far to be taken
// (power-off: the VM is about to go).
func (s *Server) flushLog(d time.Duration) {
	if s.Log == nil {
		return
	}
	s.logOnce.Do(func() { s.logq = newLogQueue(s.Log) })
	s.logq.flush(d)
}

// logf writes a console line without waiting for the console (logqueue.go).
func (s *Server) logf(format string, a ...any) {
	if s.Log == nil {
		return
	}
	s.logOnce.Do(func() { s.logq = newLogQueue(s.Log) })
	s.logq.push(fmt.Sprintf("isorun-agent: "+format+"\n", a...))
}

// apiError is an error RESP: {"ok":false,"code","error"}.
type apiError struct {
	Code string
	Msg  string
}

func (e *apiError) Error() string { return e.Code + ": " + e.Msg }

func errf(code, format string, a ...any) *apiError {
	return &apiError{Code: code, Msg: fmt.Sprintf(format, a...)}
}

// maxErrorText bounds an error RESP's text. A longer one loses its middle: it
// starts with what failed and on which path, and ends with why.
const maxErrorText = 2048

func errResp(code, msg string) map[string]any {
	if len(msg) > maxErrorText {
		const gap = " ... "
		head := cutText(msg, maxErrorText/2)
		tail := msg[len(msg)-(maxErrorText-len(head)-len(gap)):]
		for len(tail) > 0 && !utf8.RuneStart(tail[0]) {
			tail = tail[1:]
		}
		msg = head + gap + tail
	}
	return map[string]any{"ok": false, "code": code, "error": msg}
}

// handler answers one request. It returns the RESP body, or (nil, nil) if
// it has already sent its RESP itself.
type handler func(s *Server, ch *Channel, raw []byte) (any, error)

var handlers map[string]handler

func init() {
	handlers = map[string]handler{
		"hello": opHello, "health": opHealth, "metrics": opMetrics,
		"set_clock": opSetClock, "reseed": opReseed, "shutdown": opShutdown,
		"exec": opExec, "attach": opAttach, "list_procs": opListProcs,
		"signal": opSignal, "kill": opKill, "resize": opResize,
		"close_stdin": opCloseStdin, "set_defaults": opSetDefaults,
		"read_file": opReadFile, "write_file": opWriteFile, "list": opList,
		"stat": opStat, "mkdir": opMkdir, "remove": opRemove, "rename": opRename,
		"watch": opWatch, "setup_root": opSetupRoot, "keepalive": opKeepalive,
		"set_vsock_key": opSetVsockKey,
	}
}

func (s *Server) handle(ch *Channel, raw []byte) {
	defer func() {
		if r := recover(); r != nil {
			s.logf("panic in request: %v\n%s", r, debug.Stack())
			_ = ch.Resp(errResp("internal", fmt.Sprint(r)))
		}
	}()
	var head struct {
		Op string `json:"op"`
	}
	var resp any
	var err error
	if e := json.Unmarshal(raw, &head); e != nil {
		err = errf("invalid", "request is not a JSON object with a string op: %v", e)
	} else if h := handlers[head.Op]; h == nil {
		err = errf("invalid", "unknown op %q", head.Op)
	} else {
		resp, err = h(s, ch, raw)
	}
	if err != nil {
		if ae, ok := err.(*apiError); ok {
			resp = errResp(ae.Code, ae.Msg)
		} else {
			resp = errResp(fsCode(err), err.Error())
		}
	}
	if resp != nil {
		_ = ch.Resp(resp)
	}
}

// decode strictly parses a request into v (which has an "op" field).
func decode(raw []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return errf("invalid", "%v", err)
	}
	if _, err := d.Token(); err != io.EOF {
		return errf("invalid", "trailing data after the request object")
	}
	return nil
}

func ok(kv ...any) map[string]any {
	m := map[string]any{"ok": true}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

// isPID1 is true when the agent is the guest's init.
var isPID1 = os.Getpid() == 1
