package agent

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// ptyInput writes a PTY's input (stdin, ^D) without an OS thread waiting while the
// terminal's input is full and its program does not read: the master is non-blocking and
// outside the runtime poller (see openPTY), so a write that would block waits for
// EPOLLOUT through an epoll instance of its own, as the pump's reads wait for EPOLLIN.
type ptyInput struct {
	mu     sync.Mutex // held for a whole write (a waiting one parks): nothing lands inside it
	last   byte       // the last byte written (0: none yet)
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
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.write(b)
}

// End sends the terminal's end of input after what was written. ^D ends input only at
// the start of a line; after a partial line it just hands that line over, so a second
// one is needed (a terminal turns the Enter key's \r into \n).
func (w *ptyInput) End() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	eof := []byte{4, 4}
	if l := w.last; l == 0 || l == '\n' || l == '\r' || l == 4 {
		eof = eof[:1]
	}
	_, err := w.write(eof)
	return err
}

func (w *ptyInput) write(b []byte) (int, error) {
	mrc, erc, err := rawConns(w.master, w.ep)
	if err != nil {
		return 0, err
	}
	done, hungUp := 0, false
	defer func() {
		if done > 0 {
			w.last = b[done-1]
		}
	}()
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
		case werr == unix.EAGAIN && hungUp:
			// No one has the terminal open any more (the hang-up is reported for good): a
			// write fills what the tty still holds, then nothing will ever make room.
			return done, &os.PathError{Op: "write", Path: w.master.Name(), Err: unix.EIO}
		case werr == unix.EAGAIN:
			events, err := waitReady(mrc, erc, unix.EPOLLOUT)
			if err != nil {
				return done, err
			}
			hungUp = events&(unix.EPOLLHUP|unix.EPOLLERR) != 0
		case werr != nil:
			return done, &os.PathError{Op: "write", Path: w.master.Name(), Err: werr}
		}
	}
	return done, nil
}

// Close ends a write waiting for room; the master is closed with the process's output.
func (w *ptyInput) Close() { w.ep.Close() }
