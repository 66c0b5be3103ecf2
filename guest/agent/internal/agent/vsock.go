package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// parseVsockPort reads the isorun.vsock= kernel parameter: the port to serve
// on, or 0 when the host talks over virtio-serial only.
func parseVsockPort(cmdline string) (uint32, error) {
	v := cmdlineParam(cmdline, "isorun.vsock")
	if v == "" {
		return 0, nil
	}
	port, err := strconv.ParseUint(v, 10, 32)
	if err != nil || port == 0 || port == 0xFFFFFFFF {
		return 0, errors.New("isorun.vsock=" + v + " is not a vsock port (1..4294967294)")
	}
	return uint32(port), nil
}

// ServeVsock accepts host connections on a vsock port until the listener
// fails. A peer must be the host (CID 2) and say hello first with the key the
// serial port's host set (vsockkey.go). The newest host connection wins: a
// restarted daemon's connection replaces its predecessor's, as a new hello
// does on the serial port.
//
// Plain syscalls from x/sys/unix rather than a vsock package built on `net`:
// linking `net` costs every boot its package init and ~190 KB more
// initramfs to unpack, 5-15 ms under TCG, for four calls.
func (s *Server) ServeVsock(port uint32) error {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("vsock socket: %w", err)
	}
	defer unix.Close(fd)
	// Any local CID: the guest's own CID is known only once a vsock device
	// has probed, and the peer check below is what restricts who connects.
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		return fmt.Errorf("vsock bind: %w", err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		return fmt.Errorf("vsock listen: %w", err)
	}
	return s.serveHostConns(func() (acceptedConn, error) {
		nfd, sa, err := acceptRetrying(fd, s.logf)
		if err != nil {
			return acceptedConn{}, fmt.Errorf("vsock accept: %w", err)
		}
		return acceptedConn{os.NewFile(uintptr(nfd), "vsock"), describePeer(sa), fromHost(sa)}, nil
	}, defaultVsockLimits)
}

// acceptRetrying accepts a connection on the listening fd, non-blocking so
// that *os.File polls it and Close interrupts a Read. Running short of fds or
// memory passes: it waits and retries (ending the accept loop would leave the
// host unable to reach the guest for the rest of its life).
func acceptRetrying(fd int, logf func(string, ...any)) (int, unix.Sockaddr, error) {
	wait := time.Duration(0)
	for {
		nfd, sa, err := unix.Accept4(fd, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		switch {
		case err == nil:
			return nfd, sa, nil
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.ECONNABORTED):
		case errors.Is(err, unix.EMFILE), errors.Is(err, unix.ENFILE),
			errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.ENOMEM):
			if wait == 0 {
				logf("vsock accept: %v; retrying until it passes", err)
				wait = 50 * time.Millisecond
			}
			time.Sleep(wait)
			wait = min(2*wait, time.Second)
		default:
			return -1, nil, err
		}
	}
}

// acceptedConn is one accepted connection and the verdict on its peer.
type acceptedConn struct {
	conn     io.ReadWriteCloser
	peer     string
	fromHost bool
}

// vsockLimits bounds the connections that have not shown the key yet (any
// local user of the host can open them).
type vsockLimits struct {
	// waiting: at most this many at once; a new one closes the oldest (closing
	// the newest instead would let a few idle ones lock the host out).
	waiting int
	within  time.Duration // each has this long to show the key
}

var defaultVsockLimits = vsockLimits{waiting: 32, within: 5 * time.Second}

// maxAdmissionPayload bounds the first frame of a vsock connection (a hello
// with the key is ~150 bytes): what one that has not shown the key may hold.
const maxAdmissionPayload = 4096

// serveHostConns is the accept loop of ServeVsock, apart so that a test can
// drive it with any listener and limits. A connection replaces the host's
// current one only once it showed the key: a stranger's connect ends nothing.
func (s *Server) serveHostConns(accept func() (acceptedConn, error), lim vsockLimits) error {
	var mu sync.Mutex
	var current io.ReadWriteCloser
	var waiting []io.ReadWriteCloser // not admitted yet, oldest first (under mu)
	unwait := func(c io.ReadWriteCloser) bool {
		for i, w := range waiting {
			if w == c {
				waiting = append(waiting[:i], waiting[i+1:]...)
				return true
			}
		}
		return false
	}
	for {
		a, err := accept()
		if err != nil {
			return err
		}
		c := a.conn
		if !a.fromHost {
			s.logf("vsock: refused a connection from %s: only the host may connect", a.peer)
			_ = c.Close()
			continue
		}
		mu.Lock()
		if len(waiting) >= lim.waiting {
			_ = waiting[0].Close()
			waiting = waiting[1:]
		}
		waiting = append(waiting, c)
		mu.Unlock()
		setReadDeadline(c, time.Now().Add(lim.within))
		go func() {
			// c becomes the host's connection, unless it was closed meanwhile as the
			// oldest waiting one (called again by a new hello on the same stream)
			admitted := func() bool {
				mu.Lock()
				defer mu.Unlock()
				if !unwait(c) && current != c {
					return false
				}
				setReadDeadline(c, time.Time{})
				if current != nil && current != c {
					_ = current.Close()
				}
				current = c
				return true
			}
			err := s.serveVsockConn(c, admitted)
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				s.logf("vsock: %s showed no key within %v", a.peer, lim.within)
			case err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) &&
				!errors.Is(err, io.ErrUnexpectedEOF) && err != errConnClosed:
				s.logf("vsock: %s: %v", a.peer, err)
			}
			_ = c.Close()
			mu.Lock()
			unwait(c)
			if current == c {
				current = nil
			}
			mu.Unlock()
		}()
	}
}

// serveVsockConn reads the first frame with no buffer of its own (until it
// has shown the key a connection holds that frame only), then serves it.
func (s *Server) serveVsockConn(c io.ReadWriter, admitted func() bool) error {
	fr := NewFrameReader(c)
	fr.max = maxAdmissionPayload
	first, err := fr.Read()
	if err != nil {
		return err
	}
	return s.serveConn(c, bufio.NewReaderSize(c, 2*MaxPayload), admitted, &first)
}

// setReadDeadline sets c's read deadline where it has one (vsock fds and the
// tests' unix sockets do); the zero time clears it.
func setReadDeadline(c io.ReadWriteCloser, t time.Time) {
	if d, ok := c.(interface{ SetReadDeadline(time.Time) error }); ok {
		_ = d.SetReadDeadline(t)
	}
}

// fromHost reports whether a vsock peer is the host (CID 2). Without this
// check a process inside the guest could reach the agent through the
// loopback transport (CID 1) and run anything as root, whatever user it runs as.
func fromHost(sa unix.Sockaddr) bool {
	vm, ok := sa.(*unix.SockaddrVM)
	return ok && vm.CID == unix.VMADDR_CID_HOST
}

func describePeer(sa unix.Sockaddr) string {
	if vm, ok := sa.(*unix.SockaddrVM); ok {
		return fmt.Sprintf("cid %d port %d", vm.CID, vm.Port)
	}
	return fmt.Sprintf("%T", sa)
}
