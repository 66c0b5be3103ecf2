package agent

import (
	"errors"
	"io"
	"net"
	"strconv"
	"sync"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// hostCID is the only peer the agent talks to over vsock. Without this check
// a process inside the guest could reach the agent through the loopback
// transport (CID 1) and run anything as root, whatever user it runs as.
const hostCID = vsock.Host

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
// fails. The newest host connection wins: a restarted daemon's connection
// replaces its predecessor's, as a new hello does on the serial port.
func (s *Server) ServeVsock(port uint32) error {
	// Any local CID: the guest's own CID is known only once a vsock device
	// has probed, and the peer check below is what restricts who connects.
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
	if err != nil {
		return err
	}
	defer l.Close()
	return s.serveHostConns(l, fromHost)
}

// serveHostConns is the accept loop of ServeVsock, apart so that any
// net.Listener can drive it.
func (s *Server) serveHostConns(l net.Listener, peerAllowed func(net.Addr) bool) error {
	var mu sync.Mutex
	var current net.Conn
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		if !peerAllowed(c.RemoteAddr()) {
			s.logf("vsock: refused a connection from %v: only the host may connect", c.RemoteAddr())
			_ = c.Close()
			continue
		}
		mu.Lock()
		if current != nil {
			_ = current.Close()
		}
		current = c
		mu.Unlock()
		go func() {
			err := s.ServeConn(c)
			if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) &&
				!errors.Is(err, io.ErrUnexpectedEOF) && err != errConnClosed {
				s.logf("vsock: %v", err)
			}
			_ = c.Close()
			mu.Lock()
			if current == c {
				current = nil
			}
			mu.Unlock()
		}()
	}
}

// fromHost reports whether a vsock peer address is the host's.
func fromHost(a net.Addr) bool {
	va, ok := a.(*vsock.Addr)
	return ok && va.ContextID == hostCID
}
