package agent

import (
	"bufio"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// PortName is the virtio-serial port the host talks to.
const PortName = "isorun.agent"

// findPort returns /dev/vportXpY for the named port, polling sysfs (no udev
// here; devtmpfs creates the node when the port appears).
func findPort(name string, d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/vport*/name")
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(n))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", errors.New("virtio-serial port " + name + " not found")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// ServePort serves the port forever. A read of 0 bytes means no host is
// connected: the connection state is dropped and reading resumes shortly.
func (s *Server) ServePort(port *os.File) {
	br := bufio.NewReaderSize(port, 2*MaxPayload)
	for {
		err := s.serveConn(port, br, nil, nil)
		br.Reset(port) // what a dropped connection left unread is not the next one's
		switch {
		case errors.Is(err, ErrViolation):
			s.logf("%v: dropping the connection", err)
			discardUntilEOF(port)
		case err != nil && err != io.EOF && err != io.ErrUnexpectedEOF && err != errConnClosed:
			s.logf("port: %v", err)
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// discardUntilEOF skips the rest of a broken stream until the host
// disconnects; resynchronising inside it is impossible.
func discardUntilEOF(r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n == 0 || err != nil {
			return
		}
	}
}
