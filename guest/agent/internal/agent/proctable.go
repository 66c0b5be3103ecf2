package agent

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ProcTable owns the processes started for one Server.
type ProcTable struct {
	mu    sync.Mutex
	byID  map[string]*Proc
	order []*Proc // exited, oldest first (retention)
	next  int
	live  int
}

// NewProcTable returns an empty table.
func NewProcTable() *ProcTable {
	return &ProcTable{byID: map[string]*Proc{}}
}

// The reaper is process-wide (wait4(-1) sees every child). forkMu is held
// across fork and by the reaper, so a pid is always registered before it
// can be reaped. Lock order: forkMu, then a table's mu.
var (
	forkMu     sync.Mutex
	byPid      = map[int]*Proc{}
	reaperOnce sync.Once
)

// spawnSpec is a validated exec request.
type spawnSpec struct {
	path     string // resolved program; "" when failCode is set
	argv     []string
	env      []string
	dir      string
	cred     *syscall.Credential
	pty      *unix.Winsize
	stdin    bool
	ring     int64
	tag      string
	timeout  time.Duration
	failCode int // 126/127: report as a process that could not start
	failMsg  string
}

// maxFailMsg bounds the message of a process that could not start: well
// below the smallest ring (minRing), which must hold it whole.
const maxFailMsg = 4 << 10

var errBusy = fmt.Errorf("too many live processes (max %d)", maxLive)

// StartReaper reaps children on SIGCHLD (and on a slow tick, in case a
// signal was coalesced away), dispatching statuses by pid and silently
// reaping orphans (we are PID 1).
func (t *ProcTable) StartReaper() { startReaper() }

func startReaper() {
	reaperOnce.Do(func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGCHLD)
		go func() {
			tick := time.NewTicker(time.Second)
			for {
				select {
				case <-sig:
				case <-tick.C:
				}
				reap()
			}
		}()
	})
}

func reap() {
	forkMu.Lock()
	defer forkMu.Unlock()
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if p := byPid[pid]; p != nil {
			delete(byPid, pid)
			p.finish(ws, time.Now())
			p.table.exited(p)
		}
	}
}

func (t *ProcTable) exited(p *Proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.live--
	t.retire(p)
}

// exitedRingBudget bounds the output kept for exited processes: 256 of them
// with full default rings would hold 256 MiB of a small guest's memory.
var exitedRingBudget int64 = 32 << 20

// retire keeps the most recent exited processes, and the output of as many
// of them as fits exitedRingBudget (newest first; the newest always);
// called with t.mu held.
func (t *ProcTable) retire(p *Proc) {
	t.order = append(t.order, p)
	for len(t.order) > keepExited {
		delete(t.byID, t.order[0].ID)
		t.order[0] = nil
		t.order = t.order[1:]
	}
	t.trim()
}

// trimExited applies exitedRingBudget again: a ring is freed only once its
// output is complete and no lossless reader needs it, which is often after
// the exit that retired its process (a job holding the pipe, a foreground
// exec still streaming).
func (t *ProcTable) trimExited() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.trim()
}

// trim frees the output of exited processes past exitedRingBudget; called
// with t.mu held.
func (t *ProcTable) trim() {
	held := int64(0)
	for i := len(t.order) - 1; i >= 0; i-- {
		r := t.order[i].ring
		if held += r.Held(); held > exitedRingBudget && i < len(t.order)-1 {
			held -= r.Release()
		}
	}
}

// Get returns a process by id.
func (t *ProcTable) Get(id string) *Proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byID[id]
}

// Live returns the number of running processes.
func (t *ProcTable) Live() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.live
}

// All returns every process, oldest first.
func (t *ProcTable) All() []*Proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	ps := make([]*Proc, 0, len(t.byID))
	for _, p := range t.byID {
		ps = append(ps, p)
	}
	return ps
}

// Start spawns spec. With lossless, it also returns a cursor at offset 0
// that the output producer will wait for (foreground exec).
func (t *ProcTable) Start(s *spawnSpec, lossless bool) (*Proc, *Cursor, error) {
	t.StartReaper()
	p := &Proc{table: t, Argv: s.argv, Tag: s.tag, PTY: s.pty != nil, ring: NewRing(s.ring),
		exited: make(chan struct{}), drained: make(chan struct{}), StartedAt: time.Now()}
	var cur *Cursor
	if lossless {
		cur = p.ring.Cursor(0, true)
	}
	t.mu.Lock()
	if t.live >= maxLive {
		t.mu.Unlock()
		return nil, nil, errBusy
	}
	t.next++
	p.ID = "p" + strconv.Itoa(t.next)
	t.mu.Unlock()

	if s.failCode == 0 {
		err := t.fork(p, s)
		if errors.Is(err, syscall.EMFILE) && raiseOpenFilesLimit() {
			err = t.fork(p, s) // the files its pipes or terminal need, once more
		}
		if err == errBusy {
			return nil, nil, err
		} else if err == syscall.EACCES && !searchableBy(s.dir, s.cred) {
			s.failCode, s.failMsg = 127, fmt.Sprintf("cwd %s: permission denied for uid %d",
				s.dir, s.cred.Uid)
		} else if err != nil {
			s.failCode, s.failMsg = startFailure(s.argv[0], err)
		}
	}
	if s.failCode != 0 {
		p.failCode = s.failCode
		// Cut: it quotes what the request gave (a user name, a cwd), and a
		// foreground exec's lossless reader starts only after this write.
		msg := s.failMsg
		if len(msg) > maxFailMsg {
			msg = cutText(msg, maxFailMsg) + "..."
		}
		p.ring.Write(streamErr, []byte("isorun-agent: "+msg+"\n"))
		p.ring.Close()
		close(p.drained)
		t.mu.Lock()
		t.byID[p.ID] = p
		p.endAt = time.Now()
		close(p.exited)
		t.retire(p)
		t.mu.Unlock()
		return p, cur, nil
	}
	if s.timeout > 0 {
		timer := time.AfterFunc(s.timeout, func() {
			if !p.ended() {
				p.timedOut.Store(true)
				p.Terminate(killGraceSecs)
			}
		})
		// stopped once the process has ended (exited and its output closed; a
		// process may close its output and run on): a pending timer holds the
		// record (and its ring) for the whole timeout otherwise
		go func() {
			<-p.ring.Done()
			<-p.exited
			timer.Stop()
		}()
	}
	return p, cur, nil
}

func startFailure(prog string, err error) (int, string) {
	code := 127
	if err == syscall.EACCES || err == syscall.ENOEXEC || err == syscall.EPERM || err == syscall.EISDIR {
		code = 126
	}
	if err == syscall.EAGAIN {
		return 126, prog + ": cannot fork: the sandbox's processes are at their limit " +
			"(pids.max of /sys/fs/cgroup/" + procGroupName + ") or memory is short: " + err.Error()
	}
	return code, prog + ": " + err.Error()
}

// fork sets up stdio, forks under the table lock and starts output pumps.
func (t *ProcTable) fork(p *Proc, s *spawnSpec) error {
	var childFiles []*os.File // closed in the parent after fork
	defer func() {
		for _, f := range childFiles {
			f.Close()
		}
	}()
	var parentFiles []*os.File // closed on failure
	fail := func(err error) error {
		for _, f := range parentFiles {
			f.Close()
		}
		return err
	}
	sys := &syscall.SysProcAttr{Credential: s.cred}
	var files []uintptr
	var outs []*os.File
	var streams []uint8
	if s.pty != nil {
		master, slave, err := openPTY()
		if err != nil {
			return err
		}
		parentFiles = append(parentFiles, master)
		childFiles = append(childFiles, slave)
		_ = setWinsize(master, s.pty)
		if s.cred != nil {
			// the terminal is its user's (as grantpt makes it), so it can
			// reopen it by name: screen, pinentry, `exec 3>$(tty)`
			_ = slave.Chown(int(s.cred.Uid), -1)
		}
		files = []uintptr{slave.Fd(), slave.Fd(), slave.Fd()}
		sys.Setsid, sys.Setctty, sys.Ctty = true, true, 0
		p.pty, p.stdin = master, master
		outs, streams = []*os.File{master}, []uint8{streamOut}
	} else {
		sys.Setpgid = true
		var in *os.File
		if s.stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return err
			}
			in, p.stdin = r, w
			parentFiles = append(parentFiles, w)
		} else if f, err := os.Open(os.DevNull); err == nil {
			in = f
		} else if r, w, err := os.Pipe(); err == nil { // no /dev/null: an empty pipe
			w.Close()
			in = r
		} else {
			return err
		}
		childFiles = append(childFiles, in)
		files = append(files, in.Fd())
		for _, st := range []uint8{streamOut, streamErr} {
			r, w, err := os.Pipe()
			if err != nil {
				return fail(err)
			}
			setPipeSize(r, outPipeSize)
			parentFiles = append(parentFiles, r)
			childFiles = append(childFiles, w)
			files = append(files, w.Fd())
			outs, streams = append(outs, r), append(streams, st)
		}
	}
	var pumped []*outFd
	for i, f := range outs {
		o, err := newOutFd(f, streams[i], f != p.pty)
		if err != nil {
			return closeOuts(pumped, nil, fail(err))
		}
		pumped = append(pumped, o)
	}
	if p.pty != nil {
		in, err := newPTYInput(p.pty)
		if err != nil {
			return closeOuts(pumped, nil, fail(err))
		}
		p.ptyIn = in
	}
	attr := &syscall.ProcAttr{Dir: s.dir, Env: s.env, Files: files, Sys: sys}
	forkMu.Lock()
	t.mu.Lock()
	busy := t.live >= maxLive
	t.mu.Unlock()
	if busy {
		forkMu.Unlock()
		return closeOuts(pumped, p.ptyIn, fail(errBusy))
	}
	procGroup.get() // made now if not yet: not timed as the process's start
	p.forkAt = time.Now()
	pid, err := procGroup.forkExec(s.path, s.argv, attr)
	if err != nil {
		forkMu.Unlock()
		return closeOuts(pumped, p.ptyIn, fail(err))
	}
	p.Pid = pid
	byPid[pid] = p
	t.mu.Lock()
	t.byID[p.ID] = p
	t.live++
	t.mu.Unlock()
	forkMu.Unlock()

	p.parkCond.L = &p.parkMu
	p.live = len(outs)
	p.outs = pumped
	for _, o := range p.outs {
		go p.pump(o)
	}
	go func() {
		p.endOutput()
		<-p.exited
		// The process is over: one left behind that reads its stdin pipe
		// gets EOF (a PTY's master is its output too: it stays).
		p.stdinMu.Lock()
		if p.stdin != nil && p.stdin != p.pty {
			p.stdin.Close()
			p.stdin = nil
		}
		p.stdinMu.Unlock()
		// The output fds stay open until every writer is gone (EOF), so
		// none of them is killed by SIGPIPE for writing after the RESP.
		<-p.drained
		p.stdinMu.Lock()
		for _, o := range p.outs {
			o.Close()
		}
		if p.ptyIn != nil {
			p.ptyIn.Close() // a write waiting for room gives up
		}
		if p.pty != nil {
			p.pty, p.stdin = nil, nil
		}
		p.stdinMu.Unlock()
	}()
	return nil
}

// closeOuts closes the epolls of outs and in, whose files fail closed; err passes through.
func closeOuts(outs []*outFd, in *ptyInput, err error) error {
	for _, o := range outs {
		if o.ep != nil {
			o.ep.Close()
		}
	}
	if in != nil {
		in.Close()
	}
	return err
}

// setPipeSize asks for a pipe of size bytes, best effort (a smaller pipe only
// costs throughput). Through SyscallConn: File.Fd would make f blocking, and
// its reads could then no longer be interrupted by a deadline.
func setPipeSize(f *os.File, size int) {
	if rc, err := f.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { _, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, size) })
	}
}
