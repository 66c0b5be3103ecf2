package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestVsockPortParameter(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		port    uint32
		bad     bool
	}{
		{"console=ttyS0 quiet", 0, false},
		{"quiet isorun.vsock=1024 panic=-1", 1024, false},
		{"isorun.vsock=0", 0, true},
		{"isorun.vsock=4294967295", 0, true}, // VMADDR_PORT_ANY
		{"isorun.vsock=99999999999", 0, true},
		{"isorun.vsock=12ab", 0, true},
	} {
		port, err := parseVsockPort(tc.cmdline)
		if (err != nil) != tc.bad || port != tc.port {
			t.Errorf("%q: port %d err %v", tc.cmdline, port, err)
		}
	}
}

func TestOnlyTheHostCIDMayConnect(t *testing.T) {
	for _, tc := range []struct {
		addr unix.Sockaddr
		ok   bool
	}{
		{&unix.SockaddrVM{CID: unix.VMADDR_CID_HOST, Port: 51234}, true},
		{&unix.SockaddrVM{CID: unix.VMADDR_CID_LOCAL, Port: 51234}, false}, // a guest process
		{&unix.SockaddrVM{CID: unix.VMADDR_CID_HYPERVISOR, Port: 1}, false},
		{&unix.SockaddrVM{CID: 3, Port: 1}, false}, // another guest
		{&unix.SockaddrUnix{Name: "@x"}, false},
		{nil, false},
	} {
		if fromHost(tc.addr) != tc.ok {
			t.Errorf("fromHost(%v) = %v", tc.addr, !tc.ok)
		}
	}
}

// rawHello says hello on c and returns the answer's nonce, or the read error.
func rawHello(t *testing.T, c net.Conn, nonce string) (string, error) {
	t.Helper()
	req, _ := json.Marshal(map[string]any{"op": "hello", "nonce": nonce})
	if _, err := c.Write(EncodeFrame(0, KindReq, req)); err != nil {
		return "", err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := NewFrameReader(c).Read()
	if err != nil {
		return "", err
	}
	var resp map[string]any
	if err := json.Unmarshal(f.Payload, &resp); err != nil {
		t.Fatalf("hello answer %q: %v", f.Payload, err)
	}
	nonce, _ = resp["nonce"].(string)
	return nonce, nil
}

// The accept loop behind ServeVsock, on a unix listener: a refused peer is
// closed unanswered; of two accepted hosts the newer one wins.
func TestHostConnectionsRefuseOthersAndNewestWins(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	verdicts := make(chan bool, 3)
	verdicts <- false
	verdicts <- true
	verdicts <- true
	srv := NewServer(time.Now())
	served := make(chan error, 1)
	accept := func() (acceptedConn, error) {
		c, err := l.Accept()
		if err != nil {
			return acceptedConn{}, err
		}
		return acceptedConn{c, c.RemoteAddr().String(), <-verdicts}, nil
	}
	go func() { served <- srv.serveHostConns(accept) }()
	dial := func() net.Conn {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	stranger := dial()
	// Closed unanswered: the write or the read fails, depending on timing.
	if n, err := rawHello(t, stranger, "stranger"); err == nil {
		t.Fatalf("a refused peer was answered: %q", n)
	}
	first := dial()
	if n, err := rawHello(t, first, "first"); err != nil || n != "first" {
		t.Fatalf("host: %q, %v", n, err)
	}
	second := dial()
	if n, err := rawHello(t, second, "second"); err != nil || n != "second" {
		t.Fatalf("new host: %q, %v", n, err)
	}
	_ = first.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := NewFrameReader(first).Read(); !errors.Is(err, io.EOF) {
		t.Fatalf("the replaced host's connection: %v; want EOF", err)
	}
	l.Close()
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("accept loop ended with %v", err)
	}
}

// A host connecting while the agent's fd table is full (accept4: EMFILE) is
// served once fds are free again: the accept loop waits it out, not ends.
func TestAcceptWaitsOutAFullFdTable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	client, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(client)
	if err := unix.Connect(client, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	// fill the table: every fd up to a low limit taken
	low := old
	low.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var hog []int
	for {
		h, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			break
		}
		hog = append(hog, h)
	}
	var logged []string
	accepted := make(chan error, 1)
	go func() {
		nfd, _, err := acceptRetrying(fd, func(f string, a ...any) {
			logged = append(logged, fmt.Sprintf(f, a...))
		})
		if err == nil {
			unix.Close(nfd)
		}
		accepted <- err
	}()
	time.Sleep(300 * time.Millisecond) // accept4 fails EMFILE meanwhile
	for _, h := range hog {
		unix.Close(h)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-accepted:
		if err != nil {
			t.Fatalf("accept gave up: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting connection was never accepted")
	}
	if len(logged) != 1 || !strings.Contains(logged[0], "too many open files") {
		t.Fatalf("logged %q, want one line naming EMFILE", logged)
	}
}
