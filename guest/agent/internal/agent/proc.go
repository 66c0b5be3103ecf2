package agent

import (
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	maxLive       = 1024
	keepExited    = 256
	defaultRing   = 1 << 20
	maxRing       = 64 << 20
	readChunk     = 32 << 10
	drainIdle     = 100 * time.Millisecond
	killGraceSecs = 2 * time.Second
)

// Proc is one process the agent started (or failed to start).
type Proc struct {
	table     *ProcTable
	ID        string
	Pid       int
	Argv      []string
	Tag       string
	PTY       bool
	StartedAt time.Time
	forkAt    time.Time
	ring      *Ring

	stdinMu sync.Mutex
	stdin   *os.File // pipe write end, PTY master, or nil
	pty     *os.File // PTY master (also read for output)
	readers []*os.File

	exited   chan struct{} // closed once reaped
	status   syscall.WaitStatus
	failCode int // 126/127 for a program that could not start
	endAt    time.Time
	runUs    int64
	timedOut atomic.Bool
	killOnce sync.Once
}

// Exited reports whether the process has been reaped.
func (p *Proc) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// result is the JSON of a finished process (exec RESP, attach RESP).
func (p *Proc) result() map[string]any {
	m := map[string]any{"ok": true, "proc_id": p.ID, "timed_out": p.timedOut.Load()}
	code, sig := p.exitStatus()
	m["exit_code"], m["signal"] = code, sig
	m["duration_ms"] = p.endAt.Sub(p.StartedAt).Milliseconds()
	m["run_us"] = p.runUs
	return m
}

// exitStatus returns (exit_code, signal) as JSON values (nil for null).
func (p *Proc) exitStatus() (any, any) {
	if !p.Exited() {
		return nil, nil
	}
	if p.failCode != 0 {
		return p.failCode, nil
	}
	if p.status.Signaled() {
		return nil, int(p.status.Signal())
	}
	return p.status.ExitStatus(), nil
}

// ended reports whether the process is reaped and its output complete.
// Until both, its group may live on: a background child that keeps the
// pipes open and writing holds a foreground exec's RESP.
func (p *Proc) ended() bool {
	select {
	case <-p.ring.Done():
		return p.Exited()
	default:
		return false
	}
}

// Signal sends sig to the process group until the process has ended. After
// the leader's exit the group id stays reserved while members remain, so it
// is the group, never the reaped pid, that is signalled then.
func (p *Proc) Signal(sig syscall.Signal) error {
	if p.Pid <= 0 || p.ended() {
		return nil
	}
	err := syscall.Kill(-p.Pid, sig)
	if err == syscall.ESRCH && !p.Exited() {
		err = syscall.Kill(p.Pid, sig)
	}
	if err == syscall.ESRCH {
		return nil
	}
	return err
}

// Terminate sends SIGTERM, then SIGKILL after grace if it has not ended.
func (p *Proc) Terminate(grace time.Duration) {
	_ = p.Signal(syscall.SIGTERM)
	go func() {
		t := time.NewTimer(grace)
		defer t.Stop()
		for _, end := range []<-chan struct{}{p.exited, p.ring.Done()} {
			select {
			case <-end:
			case <-t.C:
				_ = p.Signal(syscall.SIGKILL)
				return
			}
		}
	}()
}

// finish records the exit status; called by the reaper under forkMu.
func (p *Proc) finish(ws syscall.WaitStatus, now time.Time) {
	p.status = ws
	p.endAt = now
	p.runUs = now.Sub(p.forkAt).Microseconds()
	close(p.exited)
	// Output still in the pipes is drained; a grandchild holding them open
	// must not keep the RESP waiting forever.
	for _, f := range p.readers {
		_ = f.SetReadDeadline(time.Now().Add(drainIdle))
	}
}

// CloseStdin closes the process's stdin (sends ^D on a PTY).
func (p *Proc) CloseStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.pty != nil {
		if p.stdin != nil {
			_, _ = p.pty.Write([]byte{4})
		}
		return
	}
	if p.stdin != nil {
		_ = p.stdin.Close()
		p.stdin = nil
	}
}

// WriteStdin writes to the process's stdin; errors (exited, closed) drop data.
func (p *Proc) WriteStdin(b []byte) {
	p.stdinMu.Lock()
	f := p.stdin
	p.stdinMu.Unlock()
	if f != nil {
		_, _ = f.Write(b)
	}
}

// pump copies one output fd into the ring until EOF or the post-exit drain
// deadline. 32 KiB reads, one copy into the ring.
func (p *Proc) pump(f *os.File, stream uint8, wg *sync.WaitGroup) {
	defer wg.Done()
	buf := make([]byte, readChunk)
	for {
		if p.Exited() {
			_ = f.SetReadDeadline(time.Now().Add(drainIdle))
		}
		n, err := f.Read(buf)
		if n > 0 {
			p.ring.Write(stream, buf[:n])
		}
		if err != nil {
			return
		}
	}
}
