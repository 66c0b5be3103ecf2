package agent

import (
	"errors"
	"io"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	maxLive     = 1024
	keepExited  = 256
	defaultRing = 1 << 20
	maxRing     = 64 << 20
	// The longest exec timeout: milliseconds past it overflow a time.Duration
	// (a timeout of "centuries" fired at once); ~292 years.
	maxTimeoutMs = int64(math.MaxInt64 / int64(time.Millisecond))
	readChunk    = 32 << 10
	// A stream that fills a read is read this much at a time from then on, out
	// of a pipe this big: under TCG every switch between the writer and the
	// agent is dear, and 32 KiB reads of a 64 KiB pipe held a flood to ~15-30
	// MiB/s through the channel (40-45 with these; bench/bench_agent.py).
	floodChunk  = 128 << 10
	outPipeSize = 256 << 10
	drainIdle   = 100 * time.Millisecond // post-exit output idle that ends the output
	drainCap    = time.Second            // post-exit drain a writer that never pauses gets
	// A PTY may hold this much more than TIOCINQ shows (the tty buffers'
	// limit); a PTY's output ends by ptyHardCap after the exit regardless.
	ptyBufferSlack = 64 << 10
	ptyHardCap     = 10 * time.Second
	discardPause   = 30 * time.Millisecond
	killGraceSecs  = 2 * time.Second
	membersPoll    = 50 * time.Millisecond // how often a grace looks for the group's rest
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
	stdin   *os.File  // pipe write end, PTY master, or nil
	pty     *os.File  // PTY master (also read for output); nil once closed
	ptyIn   *ptyInput // how a PTY's input is written (nil: not a PTY)

	// Output: one pump per fd copies into the ring until the output ends
	// (outEnded, ring closed), then reads and discards until EOF.
	outs     []*outFd
	outMu    sync.Mutex
	outEnded bool
	lastOut  time.Time // when the last chunk went into the ring
	// endOutput parks the pumps (out of Read, nothing in hand) to measure.
	parkMu   sync.Mutex
	parkCond sync.Cond
	parking  bool
	parked   int
	live     int           // pumps not yet at EOF
	drained  chan struct{} // closed once every output fd reached EOF
	killed   atomic.Bool   // timeout, CANCEL or kill fired

	exited   chan struct{} // closed once reaped
	status   syscall.WaitStatus
	failCode int // 126/127 for a program that could not start
	endAt    time.Time
	runUs    int64
	timedOut atomic.Bool
	killMu   sync.Mutex
	killAt   time.Time // when the SIGKILL asked for so far is due; zero: none asked
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
// pipes open and writing holds a foreground exec's RESP, for a while
// (see endOutput).
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
	return p.kill(sig)
}

func (p *Proc) kill(sig syscall.Signal) error {
	if !p.ownsItsIDs() {
		// The leader is reaped. Its pid stays taken while its group has
		// members (as their pgid), so a process holding that pid now is a
		// newcomer, leader of a group of its own: -pid would reach it.
		return nil
	}
	err := syscall.Kill(-p.Pid, sig)
	if err == syscall.ESRCH {
		err = nil
	}
	// The process itself, if it left its group (setpgid into another group of
	// its session): the group's signal misses it, and it is what a timeout, a
	// kill or a CANCEL waits for. Under forkMu: the reaper cannot free its
	// pid for reuse in between.
	forkMu.Lock()
	defer forkMu.Unlock()
	if !p.Exited() {
		if pgrp, e := syscall.Getpgid(p.Pid); e == nil && pgrp != p.Pid {
			if e := syscall.Kill(p.Pid, sig); e != nil && e != syscall.ESRCH && err == nil {
				err = e
			}
		}
	}
	return err
}

// Terminate sends SIGTERM, then SIGKILL after grace, to the process group
// and, on a terminal, to every job of its session: whatever of it is left by
// then, the process, a member holding the output open, or one that ignored
// SIGTERM with its output redirected (that one outlived a kill and a timeout).
// SIGTERM goes once; a later call whose SIGKILL would come sooner brings it
// forward (a kill retried with a shorter grace), one whose would not is moot.
func (p *Proc) Terminate(grace time.Duration) {
	if p.Pid <= 0 || p.ended() {
		return
	}
	at := time.Now().Add(grace)
	p.killMu.Lock()
	first := p.killAt.IsZero()
	sooner := first || at.Before(p.killAt)
	if sooner {
		p.killAt = at
	}
	p.killMu.Unlock()
	if !sooner {
		return
	}
	p.killed.Store(true)
	if first {
		// SIGCONT: a stopped process acts on SIGTERM only once resumed
		p.killAll(syscall.SIGTERM, syscall.SIGCONT)
	}
	go func() {
		t := time.NewTimer(grace)
		defer t.Stop()
		for _, end := range []<-chan struct{}{p.exited, p.drained} {
			select {
			case <-end:
			case <-t.C:
				p.killAll(syscall.SIGKILL)
				return
			}
		}
		for p.membersLeft() { // looked at now and then: most end within the grace
			select {
			case <-t.C:
				p.killAll(syscall.SIGKILL)
				return
			case <-time.After(membersPoll):
			}
		}
	}()
}

// killAll sends sigs, in order, to the process group and, for a terminal, to
// the rest of its session (looked up once): an interactive shell runs each
// job in a group of its own, which a signal to the shell's group does not reach.
func (p *Proc) killAll(sigs ...syscall.Signal) {
	var groups []int
	if p.PTY && p.ownsItsIDs() {
		// by group, not pid: a group's id stays reserved while it has members,
		// where a member's pid may be reused once it has exited
		groups = sessionGroups("/proc", p.Pid)
	}
	for _, sig := range sigs {
		_ = p.kill(sig)
		for _, pgrp := range groups {
			_ = syscall.Kill(-pgrp, sig)
		}
	}
}

// membersLeft reports whether anything of the process's group (or, on a
// terminal, its session) still runs.
func (p *Proc) membersLeft() bool {
	if !p.ownsItsIDs() {
		return false
	}
	if err := syscall.Kill(-p.Pid, 0); err == nil || err == syscall.EPERM {
		return true
	}
	return p.PTY && len(sessionGroups("/proc", p.Pid)) > 0
}

// ownsItsIDs reports whether the group and session ids numbered as the
// process's pid are still its own: after its reaping they stay reserved
// while members remain, unless the pid itself went to a newcomer.
func (p *Proc) ownsItsIDs() bool {
	return !p.Exited() || syscall.Kill(p.Pid, 0) == syscall.ESRCH
}

// finish records the exit status; called by the reaper under forkMu.
func (p *Proc) finish(ws syscall.WaitStatus, now time.Time) {
	p.status = ws
	p.endAt = now
	p.runUs = now.Sub(p.forkAt).Microseconds()
	close(p.exited)
}

// detachCursor releases a reader of the process's output: a ring that
// reader held may now go, if the exited processes' output is over budget.
func (p *Proc) detachCursor(c *Cursor) {
	p.ring.Detach(c)
	p.table.trimExited()
}

// CloseStdin closes the process's stdin (sends ^D on a PTY).
func (p *Proc) CloseStdin() {
	p.stdinMu.Lock()
	if p.pty != nil {
		term := p.ptyIn
		p.stdinMu.Unlock()
		// Written outside the lock, like any input: a terminal whose input is
		// full holds the write until the program reads, and resize (which
		// takes the lock) must not wait for that.
		if term != nil {
			_ = term.End()
		}
		return
	}
	defer p.stdinMu.Unlock()
	if p.stdin != nil {
		_ = p.stdin.Close()
		p.stdin = nil
	}
}

// foregroundGroup is the process group in the foreground of the process's
// terminal (0: none, not a PTY, or the terminal is gone).
func (p *Proc) foregroundGroup() int {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.pty == nil || p.Exited() {
		return 0
	}
	rc, err := p.pty.SyscallConn()
	if err != nil {
		return 0
	}
	pgrp := 0
	_ = rc.Control(func(fd uintptr) { pgrp, _ = unix.IoctlGetInt(int(fd), unix.TIOCGPGRP) })
	return pgrp
}

// takesStdin reports whether the process has a stdin to write to.
func (p *Proc) takesStdin() bool {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	return p.stdin != nil
}

// WriteStdin writes to the process's stdin; errors (exited, closed) drop data.
func (p *Proc) WriteStdin(b []byte) {
	p.stdinMu.Lock()
	var w io.Writer
	if p.stdin != nil {
		w = p.stdin
		if p.ptyIn != nil {
			w = p.ptyIn // the master, without a thread waiting for room
		}
	}
	p.stdinMu.Unlock()
	if w != nil && len(b) > 0 {
		_, _ = w.Write(b)
	}
}

// pump copies one output fd into the ring until the output ends, then
// reads and discards until EOF: a writer left behind (a background job, a
// daemon) never gets SIGPIPE or EPIPE, nor blocks on a full pipe.
// 32 KiB reads (128 KiB once a read fills one), one copy into the ring.
func (p *Proc) pump(o *outFd) {
	defer func() {
		p.parkMu.Lock()
		p.live--
		last := p.live == 0
		p.parkCond.Broadcast()
		p.parkMu.Unlock()
		if last {
			close(p.drained)
		}
	}()
	buf := make([]byte, readChunk)
	// At most half the ring: a lossless reader (a foreground exec) makes a
	// write wait for room for all of it, so one past the ring waits for ever.
	big := int(min(floodChunk, p.ring.cap/2))
	for {
		n, err := o.Read(buf)
		if n > 0 {
			o.read.Add(int64(n))
			if !p.output(o.stream, buf[:n]) {
				if o.full(n, buf) {
					// Discarding for a writer left behind: a log line now and
					// then costs nothing, but a writer that never stops (`yes &`)
					// would keep the agent reading flat out. Past ~1 MiB/s (~130
					// KiB/s to a terminal) it blocks on its full pipe or terminal
					// instead (it is not killed).
					time.Sleep(discardPause)
				}
			} else if n == len(buf) && n < big { // the ring has its copy
				buf = make([]byte, big)
			} else if o.pauses(n) {
				time.Sleep(coalescePause)
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			// endOutput is measuring: wait until it is done.
			p.parkMu.Lock()
			p.parked++
			p.parkCond.Broadcast()
			for p.parking {
				p.parkCond.Wait()
			}
			p.parked--
			p.parkMu.Unlock()
		default:
			return
		}
	}
}

// output appends b to the ring unless the output has ended (false: b is
// discarded). The ring may
// make it wait for a lossless reader (a foreground exec waiting for host
// credit).
func (p *Proc) output(stream uint8, b []byte) bool {
	p.outMu.Lock()
	defer p.outMu.Unlock()
	if p.outEnded {
		return false
	}
	p.ring.Write(stream, b)
	p.lastOut = time.Now()
	return true
}

// park stops every pump outside Read with nothing in hand (waiting for
// ring room first, if a pump is); false if all have reached EOF, or if a
// pump cannot be stopped (never for our pipes and PTY masters).
func (p *Proc) park() bool {
	p.parkMu.Lock()
	p.parking = true
	p.parkMu.Unlock()
	for _, o := range p.outs {
		if err := o.interrupt(); err != nil {
			return false
		}
	}
	p.parkMu.Lock()
	defer p.parkMu.Unlock()
	for p.parked < p.live {
		p.parkCond.Wait()
	}
	return p.live > 0
}

func (p *Proc) unpark() {
	for _, o := range p.outs {
		o.resume()
	}
	p.parkMu.Lock()
	p.parking = false
	p.parkCond.Broadcast()
	p.parkMu.Unlock()
}

// unread is how many bytes wait in the pipe (or PTY) f.
func unread(f *os.File) int64 {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }) // FIONREAD
	return int64(n)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// endOutput closes the ring once the output is complete: every output fd
// reached EOF, or the process has exited and then either its output has
// been idle for drainIdle with nothing left unread, or drainCap has passed
// since the exit (drainIdle once a timeout, CANCEL or kill has fired) and
// everything the fds held at the exit has been read (so a slow host never
// loses the process's own output). Writers left behind keep the fds open;
// what they write later is discarded.
func (p *Proc) endOutput() {
	defer func() {
		p.outMu.Lock()
		p.outEnded = true
		p.ring.Close()
		p.outMu.Unlock()
		// Mostly after the exit that retired it: only now can its ring go.
		p.table.trimExited()
	}()
	select {
	case <-p.drained:
		return
	case <-p.exited:
	}
	t := time.NewTimer(drainIdle)
	defer t.Stop()
	for first := true; ; first = false {
		select {
		case <-p.drained:
			return
		case <-t.C:
		}
		if !p.park() {
			p.unpark()
			return
		}
		// No pump is reading or holds data: the counts are exact.
		now := time.Now()
		since := now.Sub(p.endAt)
		empty, caughtUp := true, true
		for _, o := range p.outs {
			r, q := o.read.Load(), unread(o.f)
			if first {
				o.target = r + q
				if o.f == p.pty {
					// TIOCINQ on a PTY master counts only the line discipline's
					// buffer (< 4 KiB), not the tty buffers behind it
					o.target += ptyBufferSlack
				}
			}
			empty = empty && q == 0
			caughtUp = caughtUp && (r >= o.target || since >= ptyHardCap)
		}
		limit := drainCap
		if p.killed.Load() {
			limit = drainIdle
		}
		p.outMu.Lock()
		idle := now.Sub(later(p.lastOut, p.endAt))
		end := idle >= drainIdle && empty || since >= limit && caughtUp
		if end {
			p.outEnded = true
		}
		p.outMu.Unlock()
		p.unpark()
		if end {
			return
		}
		next := drainIdle
		if idle < drainIdle {
			next = drainIdle - idle
		}
		if since < limit {
			next = min(next, limit-since)
		}
		t.Reset(max(next, 5*time.Millisecond))
	}
}
