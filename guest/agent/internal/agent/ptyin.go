package agent

import (
	"os"

	"golang.org/x/sys/unix"
)

// ptyInput writes a PTY's input (stdin, ^D) without an OS thread waiting while the
// terminal's input is full and its program does not read: the master is non-blocking and
// outside the runtime poller (see openPTY), so a write that would block waits for
// EPOLLOUT through an epoll instance of its own, as the pump's reads wait for EPOLLIN.
type ptyInput struct {
	master *os.File
	ep     *os.File
}

func newPTYInput(master *os.File) (*ptyInput, error) {
	ep, err := oneShotEpoll(master)
	if err != nil {
		return nil, err
	}
	return &ptyInput{master: master, ep: ep}, nil
}

// Write writes all of b, waiting for room as the program reads; an error once the
// terminal is closed on the program's side (EIO) or this input is closed.
func (w *ptyInput) Write(b []byte) (int, error) {
	mrc, err := w.master.SyscallConn()
	if err != nil {
		return 0, err
	}
	erc, err := w.ep.SyscallConn()
	if err != nil {
		return 0, err
	}
	done := 0
	for done < len(b) {
		n, werr := 0, error(nil)
		if err := mrc.Control(func(fd uintptr) {
			for {
				if n, werr = unix.Write(int(fd), b[done:]); werr != unix.EINTR {
					return
				}
			}
		}); err != nil {
			return done, err
		}
		done += max(n, 0)
		switch {
		case werr == unix.EAGAIN:
			if err := waitReady(mrc, erc, unix.EPOLLOUT); err != nil {
				return done, err
			}
		case werr != nil:
			return done, &os.PathError{Op: "write", Path: w.master.Name(), Err: werr}
		}
	}
	return done, nil
}

// Close ends a write waiting for room; the master is closed with the process's output.
func (w *ptyInput) Close() { w.ep.Close() }
