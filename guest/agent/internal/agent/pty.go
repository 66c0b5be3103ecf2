package agent

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// openPTY opens a PTY pair. The master is outside the runtime poller: its pump
// reads, and its input is written, through epoll instances that hold it
// one-shot (outread.go, ptyin.go), because while the master is armed in an
// epoll every write a program makes to its terminal wakes the agent. It is
// non-blocking, so that no thread waits in a read or write of it. Its ioctls go
// through SyscallConn.
func openPTY() (master, slave *os.File, err error) {
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err == nil {
		err = unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0) // unlockpt
	}
	if err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("pty setup: %w", err)
	}
	name := "/dev/pts/" + strconv.FormatUint(uint64(n), 10)
	sfd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("open %s: %w", name, err)
	}
	// NewFile keeps an fd that is blocking when it looks out of the poller; only then is
	// the master made non-blocking.
	mf := os.NewFile(uintptr(fd), "/dev/ptmx")
	if err := unix.SetNonblock(fd, true); err != nil {
		mf.Close()
		unix.Close(sfd)
		return nil, nil, fmt.Errorf("pty setup: %w", err)
	}
	return mf, os.NewFile(uintptr(sfd), name), nil
}

// setWinsize resizes the terminal of master without File.Fd() (see openPTY).
func setWinsize(master *os.File, ws *unix.Winsize) error {
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws)
	}); err != nil {
		return err
	}
	return ierr
}
