package agent

import (
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// How a pump reads one output fd, and how endOutput stops it mid-read.
//
// A pipe is in the runtime poller: its pump waits there, and a read deadline in the past
// stops it. A PTY master is not. While a fd is armed in an epoll, each write a program
// makes wakes the agent, whether or not the pump is reading then; a terminal hands every
// write over on its own (the tty layer flushes each one), and under TCG each such wakeup
// cost ~110 µs, so awk printing short lines to a terminal came through at ~25 KiB/s.
// So a PTY master sits one-shot in an epoll instance of its own, which is what the
// runtime poller watches: armed only while the pump waits, disarmed by the wakeup that
// ends the wait. No OS thread waits, and a deadline on the epoll fd stops the pump as it
// does for a pipe. After a short read the pump pauses before the next, so what a program
// writes after its first piece is read a few KiB at a time without waking anyone.
const (
	// A PTY master reads at most 4 KiB (the line discipline's buffer): less than half of
	// that is a short read.
	smallRead     = 2 << 10
	coalescePause = 5 * time.Millisecond // the most a terminal's follow-on output waits
)

// outFd is one output fd of a process and what its pump has read.
type outFd struct {
	f      *os.File
	stream uint8
	read   atomic.Int64
	target int64 // read count that covers all the output present at the exit
	// For a PTY master (outside the runtime poller, see openPTY): the epoll instance that
	// holds it one-shot, itself in the runtime poller. nil for a pipe.
	ep *os.File
}

// newOutFd wraps an output fd for its pump; a file outside the runtime poller (a PTY
// master) gets the epoll instance its pump waits through.
func newOutFd(f *os.File, stream uint8, inPoller bool) (*outFd, error) {
	o := &outFd{f: f, stream: stream}
	if !inPoller {
		ep, err := oneShotEpoll(f)
		if err != nil {
			return nil, err
		}
		o.ep = ep
	}
	return o, nil
}

// oneShotEpoll makes an epoll instance holding f one-shot, disarmed until waitReady
// arms it, and puts the instance in the runtime poller.
func oneShotEpoll(f *os.File) (*os.File, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	rc, err := f.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(fd uintptr) {
			err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, int(fd),
				&unix.EpollEvent{Events: unix.EPOLLONESHOT, Fd: int32(fd)})
		})
		if err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = unix.SetNonblock(epfd, true)
	}
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return os.NewFile(uintptr(epfd), "epoll"), nil // non-blocking: NewFile puts it in the poller
}

// Read reads what the fd holds (waiting for some); os.ErrDeadlineExceeded once
// interrupt was called, until resume.
func (o *outFd) Read(buf []byte) (int, error) {
	if o.ep == nil {
		return o.f.Read(buf)
	}
	mrc, erc, err := rawConns(o.f, o.ep)
	if err != nil {
		return 0, err
	}
	for {
		if _, err := waitReady(mrc, erc, unix.EPOLLIN); err != nil {
			return 0, err
		}
		n, rerr := 0, error(nil)
		if err := mrc.Control(func(fd uintptr) {
			for {
				if n, rerr = unix.Read(int(fd), buf); rerr != unix.EINTR {
					return
				}
			}
		}); err != nil {
			return 0, err
		}
		switch {
		case rerr == unix.EAGAIN: // the master is non-blocking (see openPTY): wait again
			continue
		case rerr != nil:
			// EIO once the terminal is closed on the program's side: the end, as EOF is
			return 0, &os.PathError{Op: "read", Path: o.f.Name(), Err: rerr}
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// rawConns are the raw fds of a PTY master and of an epoll instance holding it.
func rawConns(master, ep *os.File) (mrc, erc syscall.RawConn, err error) {
	if mrc, err = master.SyscallConn(); err == nil {
		erc, err = ep.SyscallConn()
	}
	return mrc, erc, err
}

// waitReady arms the master (mrc) for events in its epoll (erc) and waits in the
// runtime poller until the epoll reports it (which disarms it again), or the epoll's
// deadline passes (os.ErrDeadlineExceeded) or it is closed.
func waitReady(mrc, erc syscall.RawConn, events uint32) (uint32, error) {
	var ctlErr error
	var got uint32
	err := erc.Read(func(epfd uintptr) bool {
		// armed here, past the poller's deadline check: a parked pump leaves it disarmed
		if err := mrc.Control(func(fd uintptr) {
			ctlErr = unix.EpollCtl(int(epfd), unix.EPOLL_CTL_MOD, int(fd),
				&unix.EpollEvent{Events: events | unix.EPOLLONESHOT, Fd: int32(fd)})
		}); err != nil && ctlErr == nil {
			ctlErr = err
		}
		if ctlErr != nil {
			return true
		}
		var ev [1]unix.EpollEvent
		k, err := unix.EpollWait(int(epfd), ev[:], 0)
		if err == nil && k > 0 {
			got = ev[0].Events
			return true
		}
		return false // wait in the poller for the epoll fd
	})
	if err != nil {
		return 0, err
	}
	if ctlErr != nil {
		return 0, os.NewSyscallError("epoll_ctl", ctlErr)
	}
	return got, nil
}

// pauses says whether the pump waits a little after a read of n bytes (see above).
func (o *outFd) pauses(n int) bool { return o.ep != nil && n < smallRead }

// full says whether a read of n bytes into buf took all it could: a writer that keeps it
// so is writing flat out.
func (o *outFd) full(n int, buf []byte) bool {
	return n == len(buf) || o.ep != nil && n >= smallRead
}

// interrupt makes a Read in progress, or the next one, return os.ErrDeadlineExceeded.
func (o *outFd) interrupt() error {
	if o.ep != nil {
		return o.ep.SetReadDeadline(time.Unix(1, 0))
	}
	return o.f.SetReadDeadline(time.Unix(1, 0))
}

// resume undoes interrupt.
func (o *outFd) resume() {
	if o.ep != nil {
		_ = o.ep.SetReadDeadline(time.Time{})
		return
	}
	_ = o.f.SetReadDeadline(time.Time{})
}

// Close closes the fd (and its epoll); once its pump has ended.
func (o *outFd) Close() {
	if o.ep != nil {
		o.ep.Close()
	}
	o.f.Close()
}
