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

// testKey is a vsock key as the host sends it.
var testKey = strings.Repeat("ab", vsockKeyBytes)

// rawHello says hello on c with extra fields (key, vsock_key) and returns the
// answer, or the read error.
func rawHello(t *testing.T, c net.Conn, nonce string, extra ...string) (map[string]any, error) {
	t.Helper()
	req := map[string]any{"op": "hello", "nonce": nonce}
	for i := 0; i+1 < len(extra); i += 2 {
		req[extra[i]] = extra[i+1]
	}
	return rawRequest(t, c, 0, req)
}

// rawRequest sends one request on channel id and returns its answer.
func rawRequest(t *testing.T, c net.Conn, id uint32, req map[string]any) (map[string]any, error) {
	t.Helper()
	b, _ := json.Marshal(req)
	if _, err := c.Write(EncodeFrame(id, KindReq, b)); err != nil {
		return nil, err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := NewFrameReader(c).Read()
	if err != nil {
		return nil, err
	}
	var resp map[string]any
	if err := json.Unmarshal(f.Payload, &resp); err != nil {
		t.Fatalf("answer %q: %v", f.Payload, err)
	}
	return resp, nil
}

// acceptingUnix serves srv's vsock accept loop on a unix listener whose every
// peer passes the CID check (or takes its verdict from verdicts); dial connects.
func acceptingUnix(t *testing.T, srv *Server, verdicts chan bool, lim vsockLimits) (dial func() net.Conn, served chan error, l net.Listener) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	served = make(chan error, 1)
	accept := func() (acceptedConn, error) {
		c, err := l.Accept()
		if err != nil {
			return acceptedConn{}, err
		}
		fromHost := true
		if verdicts != nil {
			fromHost = <-verdicts
		}
		return acceptedConn{c, c.RemoteAddr().String(), fromHost}, nil
	}
	go func() { served <- srv.serveHostConns(accept, lim) }()
	dial = func() net.Conn {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	return dial, served, l
}

// The accept loop behind ServeVsock, on a unix listener: a refused peer is
// closed unanswered; of two accepted hosts the newer one wins.
func TestHostConnectionsRefuseOthersAndNewestWins(t *testing.T) {
	verdicts := make(chan bool, 3)
	verdicts <- false
	verdicts <- true
	verdicts <- true
	srv := NewServer(time.Now())
	key, _ := parseVsockKey(testKey)
	srv.vsockKey.set(key)
	dial, served, l := acceptingUnix(t, srv, verdicts, defaultVsockLimits)

	stranger := dial()
	// Closed unanswered: the write or the read fails, depending on timing.
	if r, err := rawHello(t, stranger, "stranger", "key", testKey); err == nil {
		t.Fatalf("a refused peer was answered: %v", r)
	}
	first := dial()
	if r, err := rawHello(t, first, "first", "key", testKey); err != nil || r["nonce"] != "first" {
		t.Fatalf("host: %v, %v", r, err)
	}
	second := dial()
	if r, err := rawHello(t, second, "second", "key", testKey); err != nil || r["nonce"] != "second" {
		t.Fatalf("new host: %v, %v", r, err)
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

// A vsock peer is served only after a first hello with the key that
// set_vsock_key on the serial port set: any local user of the host can reach
// the port.
func TestAVsockHostMustPresentTheSerialPortsKey(t *testing.T) {
	srv := NewServer(time.Now())
	dial, _, _ := acceptingUnix(t, srv, nil, defaultVsockLimits)
	refused := func(what string, c net.Conn, send func() (map[string]any, error)) {
		t.Helper()
		r, err := send()
		if err == nil {
			t.Fatalf("%s: answered %v", what, r)
		}
		// closed by the agent at once, not a read of ours timing out
		if !errors.Is(err, io.EOF) && !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, unix.EPIPE) {
			t.Fatalf("%s: %v; want the connection closed", what, err)
		}
	}
	early := dial()
	refused("before any key", early, func() (map[string]any, error) {
		return rawHello(t, early, "n", "key", testKey)
	})

	serialHost, serialAgent := net.Pipe()
	t.Cleanup(func() { serialHost.Close(); serialAgent.Close() })
	go func() { _ = srv.ServeConn(serialAgent) }()
	if r, err := rawHello(t, serialHost, "s"); err != nil || r["nonce"] != "s" {
		t.Fatalf("the serial hello: %v, %v", r, err)
	}
	r, err := rawRequest(t, serialHost, 1, map[string]any{"op": "set_vsock_key", "key": "abc"})
	if err != nil || r["ok"] != false || !strings.Contains(fmt.Sprint(r["error"]), "64 hex digits") {
		t.Fatalf("a malformed key: %v, %v", r, err)
	}
	r, err = rawRequest(t, serialHost, 2, map[string]any{"op": "set_vsock_key", "key": testKey})
	if err != nil || r["ok"] != true {
		t.Fatalf("the serial port's key: %v, %v", r, err)
	}

	noKey, wrongKey, notHello := dial(), dial(), dial()
	refused("no key", noKey, func() (map[string]any, error) { return rawHello(t, noKey, "n") })
	refused("a wrong key", wrongKey, func() (map[string]any, error) {
		return rawHello(t, wrongKey, "n", "key", strings.Repeat("cd", vsockKeyBytes))
	})
	refused("health first", notHello, func() (map[string]any, error) {
		return rawRequest(t, notHello, 0, map[string]any{"op": "health", "key": testKey})
	})

	host := dial()
	if r, err := rawHello(t, host, "v", "key", testKey); err != nil || r["nonce"] != "v" {
		t.Fatalf("the keyed host: %v, %v", r, err)
	}
	if r, err := rawRequest(t, host, 1, map[string]any{"op": "health"}); err != nil || r["ok"] != true {
		t.Fatalf("a request after the keyed hello: %v, %v", r, err)
	}
	r, err = rawRequest(t, host, 2, map[string]any{"op": "set_vsock_key", "key": testKey})
	if err != nil || r["ok"] != false || !strings.Contains(fmt.Sprint(r["error"]), "serial port only") {
		t.Fatalf("a vsock host set the key: %v, %v", r, err)
	}
	// a stranger's connection, silent or keyless, does not end the host's (the
	// keyless one's refusal means the silent one was accepted: accepts are in order)
	_, keyless := dial(), dial()
	refused("no key, after the host", keyless, func() (map[string]any, error) {
		return rawHello(t, keyless, "k")
	})
	if r, err := rawRequest(t, host, 3, map[string]any{"op": "health"}); err != nil || r["ok"] != true {
		t.Fatalf("the host after strangers connected: %v, %v", r, err)
	}
	// a new hello on it starts a new host connection, which must prove itself again
	refused("a second hello without the key", host, func() (map[string]any, error) {
		return rawHello(t, host, "again")
	})
}

// Connections that have not shown the key are few and short-lived: past the
// limit a new one closes the oldest, each has a time limit, and a first frame
// larger than a hello is refused before it is read.
func TestVsockPeersWithoutTheKeyAreBoundedInNumberAndTime(t *testing.T) {
	lim := vsockLimits{waiting: 2, within: 3 * time.Second}
	srv := NewServer(time.Now())
	key, _ := parseVsockKey(testKey)
	srv.vsockKey.set(key)
	dial, _, _ := acceptingUnix(t, srv, nil, lim)
	closedWithin := func(what string, c net.Conn, within time.Duration) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(within))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("%s: %v; want EOF", what, err)
		}
	}
	start := time.Now()
	oldest, second := dial(), dial()
	// the third, while two wait, closes the oldest at once (long before its time)
	host := dial()
	closedWithin("the oldest waiting connection", oldest, time.Second)
	if r, err := rawHello(t, host, "h", "key", testKey); err != nil || r["nonce"] != "h" {
		t.Fatalf("the host while others wait: %v, %v", r, err)
	}
	big := dial()
	hdr := make([]byte, headerSize)
	putHeader(hdr, 0, KindReq, maxAdmissionPayload+1)
	if _, err := big.Write(hdr); err != nil {
		t.Fatal(err)
	}
	closedWithin("a first frame larger than a hello", big, time.Second)
	// a silent one is closed once its time is up
	closedWithin("a silent connection", second, 2*lim.within)
	if waited := time.Since(start); waited < lim.within-100*time.Millisecond {
		t.Fatalf("a silent connection was closed after %v, before its %v", waited, lim.within)
	}
	// admitted, the host has no deadline any more
	if r, err := rawRequest(t, host, 1, map[string]any{"op": "health"}); err != nil || r["ok"] != true {
		t.Fatalf("the host past the admission time: %v, %v", r, err)
	}
}
