// Command vsockprobe runs inside a guest and checks that the agent's vsock
// port turns guest processes away: only the host may connect. The host test
// suite uploads it; it is not part of the guest's initramfs.
//
// It prints one line: "control=<r> agent=<r>". control=ok means vsock
// loopback works in this guest at all (so a refusal below means something);
// agent=closed means the agent accepted the connection and closed it without
// answering a hello; agent=answered means it served a guest process.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

func main() {
	agentPort := flag.Uint("agent-port", 1024, "the agent's vsock port")
	controlPort := flag.Uint("control-port", 7777, "a free port for the loopback check")
	flag.Parse()
	fmt.Printf("control=%s agent=%s\n", control(uint32(*controlPort)), agent(uint32(*agentPort)))
}

func control(port uint32) string {
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
	if err != nil {
		return "listen:" + err.Error()
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			_, _ = io.Copy(c, c)
			c.Close()
		}
	}()
	c, err := vsock.Dial(vsock.Local, port, nil)
	if err != nil {
		return "dial:" + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return "write:" + err.Error()
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		return fmt.Sprintf("echo:%q,%v", buf, err)
	}
	return "ok"
}

func agent(port uint32) string {
	c, err := vsock.Dial(vsock.Local, port, nil)
	if err != nil {
		return "unreachable:" + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	hello := []byte(`{"op":"hello","nonce":"probe"}`)
	frame := make([]byte, 9, 9+len(hello))
	binary.BigEndian.PutUint32(frame[0:], uint32(len(hello)))
	frame[8] = 1                            // REQ on channel 0
	_, _ = c.Write(append(frame, hello...)) // may fail if already closed
	n, err := c.Read(make([]byte, 1))
	switch {
	case n > 0:
		return "answered"
	case err == io.EOF || err != nil && !isTimeout(err):
		return "closed"
	default:
		return "open:" + fmt.Sprint(err)
	}
}

func isTimeout(err error) bool {
	t, ok := err.(interface{ Timeout() bool })
	return ok && t.Timeout()
}
