package agent

import (
	"encoding/binary"
	"io"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// How a pump reads one output fd, and how endOutput stops it mid-read.
//
// A pipe stays in the runtime poller: its pump waits there, and a read deadline in the
// past stops it. A PTY master is kept out of it. While a fd is in the poller's epoll, each
// write a program makes wakes the agent, whether or not the pump is reading then; a
// terminal hands every write over on its own (the tty layer flushes each one), and under
// TCG each such wakeup cost ~110 µs, so awk printing short lines to a terminal came
// through at ~25 KiB/s. A PTY's pump waits in poll(2) on the master and on an eventfd
// that stops it, and after a short read pauses before the next, so that what a program
// writes after its first piece is read in a few KiB at a time without waking anyone.
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
	wake   int   // eventfd whose count stops a read of a PTY master; -1 for a pipe
}

// newOutFd wraps an output fd for its pump; a file outside the runtime poller (a PTY
// master, see openPTY) gets the eventfd that stops its reads.
func newOutFd(f *os.File, stream uint8, inPoller bool) (*outFd, error) {
	o := &outFd{f: f, stream: stream, wake: -1}
	if !inPoller {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return nil, os.NewSyscallError("eventfd", err)
		}
		o.wake = fd
	}
	return o, nil
}

// Read reads what the fd holds (waiting for some); os.ErrDeadlineExceeded once
// interrupt was called, until resume.
func (o *outFd) Read(buf []byte) (int, error) {
	if o.wake < 0 {
		return o.f.Read(buf)
	}
	rc, err := o.f.SyscallConn()
	if err != nil {
		return 0, err
	}
	n, rerr := 0, error(nil)
	if err := rc.Control(func(fd uintptr) { n, rerr = o.pollRead(int(fd), buf) }); err != nil {
		return 0, err
	}
	return n, rerr
}

func (o *outFd) pollRead(fd int, buf []byte) (int, error) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(o.wake), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err == nil {
			break
		} else if err != unix.EINTR {
			return 0, os.NewSyscallError("poll", err)
		}
	}
	if fds[1].Revents != 0 {
		var count [8]byte
		_, _ = unix.Read(o.wake, count[:])
		return 0, os.ErrDeadlineExceeded
	}
	for {
		// POLLIN or POLLHUP: the read does not block (data, or EIO once the terminal
		// is closed on the program's side, which ends the pump as EOF does)
		n, err := unix.Read(fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, &os.PathError{Op: "read", Path: o.f.Name(), Err: err}
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// pauses says whether the pump waits a little after a read of n bytes (see above).
func (o *outFd) pauses(n int) bool { return o.wake >= 0 && n < smallRead }

// interrupt makes a Read in progress, or the next one, return os.ErrDeadlineExceeded.
func (o *outFd) interrupt() error {
	if o.wake < 0 {
		return o.f.SetReadDeadline(time.Unix(1, 0))
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, err := unix.Write(o.wake, one[:])
	return err
}

// resume undoes interrupt (a PTY's pump consumed its wakeup when it stopped).
func (o *outFd) resume() {
	if o.wake < 0 {
		_ = o.f.SetReadDeadline(time.Time{})
	}
}

// Close closes the fd and the eventfd; only once its pump ended and endOutput returned
// (no interrupt can follow).
func (o *outFd) Close() {
	o.f.Close()
	if o.wake >= 0 {
		unix.Close(o.wake)
		o.wake = -1
	}
}
