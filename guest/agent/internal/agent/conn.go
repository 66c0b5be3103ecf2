package agent

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// errConnClosed is returned by sends once the connection is gone.
var errConnClosed = errors.New("connection closed")

// errAborted is returned when a wait is abandoned (CANCEL or connection loss).
var errAborted = errors.New("aborted")

// framePool recycles guest->host frame buffers (one max-size write each).
var framePool = sync.Pool{New: func() any { b := make([]byte, maxWrite); return &b }}

type outFrame struct {
	buf    []byte
	pooled *[]byte
	sent   chan struct{} // closed once written (or dropped); may be nil
}

// Conn is one host connection: a frame reader, a single writer goroutine and
// the channels opened on it. Dropping it never touches processes.
type Conn struct {
	srv   *Server
	w     io.Writer
	out   chan outFrame
	done  chan struct{}
	once  sync.Once
	wdone chan struct{}

	mu    sync.Mutex
	chans map[uint32]*Channel
	used  bool // a frame was dispatched: a later hello means a new host
	// onAdmit is non-nil on vsock, where a peer is served only after a first
	// hello carrying the key (vsockkey.go); it runs when one did, and says
	// whether the connection may go on (admitted).
	onAdmit  func() bool
	admitted bool

	keepMu    sync.Mutex
	keepEvery time.Duration // keepalive interval in effect (keepalive.go); 0: none
}

// MaxOpenChannels bounds the requests one connection has open at once (each
// holds a goroutine and its buffers); a var so that a test can lower it.
var MaxOpenChannels = 4096

// ServeConn runs the protocol on rw until the stream ends (EOF: no host) or
// a protocol violation. All channels of the connection are dropped on return;
// processes keep running. It is the whole agent minus PID 1 duties, so tests
// drive it over a net.Pipe or socketpair.
func (s *Server) ServeConn(rw io.ReadWriter) error {
	return s.serveConn(rw, bufio.NewReaderSize(rw, 2*MaxPayload), nil, nil)
}

// serveConn is ServeConn reading through br, which a caller serving one port
// over and over keeps (a 128 KiB buffer each time cost an idle guest 25 MB/s
// of garbage). Nothing is set up before the host sends its first byte: with no
// host on the serial port every read is an EOF, tried every few ms.
//
// onAdmit non-nil makes it a vsock connection (see Conn.onAdmit); first is a
// frame already read from rw, served before what br reads.
func (s *Server) serveConn(rw io.ReadWriter, br *bufio.Reader, onAdmit func() bool, first *Frame) error {
	if first == nil {
		if _, err := br.Peek(1); err != nil {
			return err
		}
	}
	for {
		c := &Conn{srv: s, w: rw, out: make(chan outFrame, 64), done: make(chan struct{}),
			wdone: make(chan struct{}), chans: map[uint32]*Channel{}, onAdmit: onAdmit}
		go c.writeLoop()
		err := c.serve(br, first)
		c.close()
		<-c.wdone // no frame of this connection may follow into the next one
		var again *errNewHost
		if !errors.As(err, &again) {
			return err
		}
		// A hello on a used connection means a new host (e.g. a restarted daemon)
		// whose predecessor's EOF the guest never saw: start clean, so the old
		// host's channels cannot collide with the new host's channel ids.
		first = &again.hello
	}
}

// errNewHost carries the hello that starts a fresh connection.
type errNewHost struct{ hello Frame }

func (e *errNewHost) Error() string { return "new host connection" }

func (c *Conn) serve(br *bufio.Reader, first *Frame) error {
	if first != nil {
		if err := c.admit(*first); err != nil {
			return err
		}
		<-c.srv.ready
		if err := c.dispatch(*first); err != nil {
			return err
		}
		c.used = true
	}
	return c.readLoop(br)
}

// admit lets a frame through: any on the serial port or stdio; on vsock, the
// first must be a hello with the key. (No key exists before the guest is
// ready: the serial port's host sets it with a request, served only then.)
func (c *Conn) admit(f Frame) error {
	if c.onAdmit == nil || c.admitted {
		return nil
	}
	if err := c.srv.vsockKey.admit(f); err != nil {
		return err
	}
	if !c.onAdmit() {
		return errNotAdmitted
	}
	c.admitted = true
	return nil
}

// errNotAdmitted: a vsock connection that showed the key had been closed
// meanwhile as the oldest of too many waiting (vsock.go).
var errNotAdmitted = errors.New("closed while it waited to show the key")

// overVsock: the connection is a vsock one.
func (c *Conn) overVsock() bool { return c.onAdmit != nil }

func (c *Conn) close() { c.once.Do(func() { close(c.done) }) }

func (c *Conn) writeLoop() {
	defer close(c.wdone)
	for {
		select {
		case <-c.done:
			return
		default:
		}
		select {
		case <-c.done:
			return
		case f := <-c.out:
			_, err := c.w.Write(f.buf)
			if f.pooled != nil {
				framePool.Put(f.pooled)
			}
			if f.sent != nil {
				close(f.sent)
			}
			if err != nil {
				c.srv.logf("write: %v", err)
				c.close()
				return
			}
		}
	}
}

func (c *Conn) enqueue(f outFrame) error {
	select {
	case c.out <- f:
		return nil
	case <-c.done:
		if f.pooled != nil {
			framePool.Put(f.pooled)
		}
		return errConnClosed
	}
}

func (c *Conn) readLoop(br *bufio.Reader) error {
	fr := NewFrameReader(br)
	for {
		f, err := fr.Read()
		if err != nil {
			return err
		}
		if f.Kind == KindReq && f.Chan == 0 && c.used {
			return &errNewHost{hello: f}
		}
		// (a vsock connection is admitted on its first frame, in serve: a guard)
		if err := c.admit(f); err != nil {
			return err
		}
		<-c.srv.ready
		c.used = true
		if err := c.dispatch(f); err != nil {
			return err
		}
	}
}

func (c *Conn) channel(id uint32) *Channel {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.chans[id]
}

// refuseBusy answers a REQ past MaxOpenChannels (each open request holds a
// goroutine and its buffers) from the reader: nothing is started or kept for
// it. The writer's queue is full whenever a few requests stream faster than
// the link carries, so the answer waits for a slot. Blocking the reader so
// cannot deadlock: the writer needs only the host to read, and the host's
// reader never waits for its writes or consumers (it sheds instead); a host
// that is gone ends the wait through c.done.
func (c *Conn) refuseBusy(chanID uint32) error {
	b, _ := json.Marshal(errResp("busy", fmt.Sprintf(
		"%d requests are open on this connection: end some first", MaxOpenChannels)))
	return c.enqueue(outFrame{buf: EncodeFrame(chanID, KindResp, b)})
}

func (c *Conn) dispatch(f Frame) error {
	switch f.Kind {
	case KindReq:
		c.mu.Lock()
		if _, dup := c.chans[f.Chan]; dup {
			c.mu.Unlock()
			return nil // host bug; the open channel keeps going
		}
		if len(c.chans) >= MaxOpenChannels {
			c.mu.Unlock()
			return c.refuseBusy(f.Chan)
		}
		ch := newChannel(c, f.Chan)
		c.chans[f.Chan] = ch
		c.mu.Unlock()
		go c.srv.handle(ch, f.Payload)
	case KindIn:
		if ch := c.channel(f.Chan); ch != nil {
			return ch.pushIn(f.Payload)
		}
	case KindEOF:
		if ch := c.channel(f.Chan); ch != nil {
			ch.pushEOF()
		}
	case KindCredit:
		if len(f.Payload) != 4 {
			return fmt.Errorf("%w: credit payload of %d bytes", ErrViolation, len(f.Payload))
		}
		if ch := c.channel(f.Chan); ch != nil {
			ch.addCredit(int64(binary.BigEndian.Uint32(f.Payload)))
		}
	case KindCancel:
		if ch := c.channel(f.Chan); ch != nil {
			ch.cancelOnce.Do(func() { close(ch.cancel) })
		}
	default:
		// guest->host kinds coming back: meaningless, ignored
	}
	return nil
}
