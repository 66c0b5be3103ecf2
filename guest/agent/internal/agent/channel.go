package agent

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync"
)

// Channel is one request's stream on a connection, with per-channel credits
// in both directions.
type Channel struct {
	id         uint32
	c          *Conn
	cancel     chan struct{} // closed on CANCEL
	cancelOnce sync.Once

	sendMu sync.Mutex // orders sends against the final RESP
	closed bool

	mu       sync.Mutex
	window   int64 // bytes of OUT/ERR we may still send
	wake     chan struct{}
	inQ      [][]byte
	inEOF    bool
	inOwed   int64 // IN bytes received and not yet credited back
	inWake   chan struct{}
	inClosed bool // consumer gone: IN is discarded and credited at once
}

func newChannel(c *Conn, id uint32) *Channel {
	return &Channel{id: id, c: c, cancel: make(chan struct{}), window: initialWindow,
		wake: make(chan struct{}, 1), inWake: make(chan struct{}, 1)}
}

// Done is closed when the connection is gone.
func (ch *Channel) Done() <-chan struct{} { return ch.c.done }

// ended says whether the request is over for its host: a CANCEL came, or the
// connection went.
func (ch *Channel) ended() bool {
	select {
	case <-ch.cancel:
		return true
	case <-ch.Done():
		return true
	default:
		return false
	}
}

// onAbort runs f once the request is cancelled or its connection is gone
// (aborted), or once the returned stop is called (not aborted), whichever
// comes first. stop must be called exactly once.
func (ch *Channel) onAbort(f func(aborted bool)) (stop func()) {
	stopped := make(chan struct{})
	go func() {
		aborted := true
		select {
		case <-ch.cancel:
		case <-ch.Done():
		case <-stopped:
			aborted = false
		}
		f(aborted)
	}()
	return func() { close(stopped) }
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// sendRaw enqueues a pre-built frame unless the channel is closed.
func (ch *Channel) sendRaw(f outFrame, final bool) error {
	ch.sendMu.Lock()
	defer ch.sendMu.Unlock()
	if ch.closed {
		if f.pooled != nil {
			framePool.Put(f.pooled)
		}
		return errConnClosed
	}
	if final {
		ch.closed = true
		ch.c.mu.Lock()
		delete(ch.c.chans, ch.id)
		ch.c.mu.Unlock()
	}
	return ch.c.enqueue(f)
}

func (ch *Channel) sendJSON(kind uint8, v any, final bool, sent chan struct{}) error {
	b, err := json.Marshal(v)
	if err == nil && len(b) > MaxOutPayload {
		err = fmt.Errorf("message of %d bytes exceeds one frame", len(b))
	}
	if err != nil {
		if !final {
			return err
		}
		b, _ = json.Marshal(errResp("internal", err.Error()))
	}
	return ch.sendRaw(outFrame{buf: EncodeFrame(ch.id, kind, b), sent: sent}, final)
}

// Event sends an EVENT frame.
func (ch *Channel) Event(v any) error { return ch.sendJSON(KindEvent, v, false, nil) }

// Resp sends the final RESP and closes the channel.
func (ch *Channel) Resp(v any) error { return ch.sendJSON(KindResp, v, true, nil) }

// acquire waits for send credit, returning up to max bytes of window.
func (ch *Channel) acquire(max int, abort <-chan struct{}) (int, error) {
	for {
		ch.mu.Lock()
		if ch.window > 0 {
			k := int64(max)
			if ch.window < k {
				k = ch.window
			}
			ch.window -= k
			ch.mu.Unlock()
			return int(k), nil
		}
		ch.mu.Unlock()
		select {
		case <-ch.wake:
		case <-ch.c.done:
			return 0, errConnClosed
		case <-abort:
			return 0, errAborted
		}
	}
}

// acquireAll is acquire that waits until it has all n bytes of window.
func (ch *Channel) acquireAll(n int, abort <-chan struct{}) (int, error) {
	got := 0
	for got < n {
		k, err := ch.acquire(n-got, abort)
		if err != nil {
			return 0, err
		}
		got += k
	}
	return got, nil
}

func (ch *Channel) addCredit(n int64) {
	ch.mu.Lock()
	if ch.window += n; ch.window > 1<<40 {
		ch.window = 1 << 40
	}
	ch.mu.Unlock()
	notify(ch.wake)
}

// newDataFrame returns a pooled buffer with room for n payload bytes.
func newDataFrame(n int) (*[]byte, []byte) {
	p := framePool.Get().(*[]byte)
	return p, (*p)[:headerSize+n]
}

// sendData sends a filled data frame; buf[headerSize:] holds the payload.
func (ch *Channel) sendData(kind uint8, p *[]byte, buf []byte) error {
	putHeader(buf, ch.id, kind, len(buf)-headerSize)
	return ch.sendRaw(outFrame{buf: buf, pooled: p}, false)
}

// writeData sends data as OUT/ERR frames, waiting for credits.
func (ch *Channel) writeData(kind uint8, data []byte, abort <-chan struct{}) error {
	for len(data) > 0 {
		k, err := ch.acquire(min(len(data), MaxOutPayload), abort)
		if err != nil {
			return err
		}
		p, buf := newDataFrame(k)
		copy(buf[headerSize:], data[:k])
		if err := ch.sendData(kind, p, buf); err != nil {
			return err
		}
		data = data[k:]
	}
	return nil
}

// pushIn queues host data; exceeding the window we granted is a violation.
func (ch *Channel) pushIn(b []byte) error {
	if len(b) == 0 {
		return nil // says nothing, and would be queued at no cost to the window
	}
	ch.mu.Lock()
	if ch.inEOF {
		ch.mu.Unlock()
		return nil
	}
	ch.inOwed += int64(len(b))
	if ch.inOwed > initialWindow {
		ch.mu.Unlock()
		return fmt.Errorf("%w: IN beyond the granted window on channel %d", ErrViolation, ch.id)
	}
	if ch.inClosed {
		ch.mu.Unlock()
		ch.creditIn(len(b))
		return nil
	}
	ch.inQ = append(ch.inQ, b)
	ch.mu.Unlock()
	notify(ch.inWake)
	return nil
}

func (ch *Channel) pushEOF() {
	ch.mu.Lock()
	ch.inEOF = true
	ch.mu.Unlock()
	notify(ch.inWake)
}

// readIn returns the next IN chunk, or eof once the host sent EOF.
func (ch *Channel) readIn(abort <-chan struct{}) (b []byte, eof bool, err error) {
	for {
		ch.mu.Lock()
		if len(ch.inQ) > 0 {
			b = ch.inQ[0]
			ch.inQ[0] = nil
			ch.inQ = ch.inQ[1:]
			ch.mu.Unlock()
			return b, false, nil
		}
		if ch.inEOF {
			ch.mu.Unlock()
			return nil, true, nil
		}
		ch.mu.Unlock()
		select {
		case <-ch.inWake:
		case <-ch.c.done:
			return nil, false, errConnClosed
		case <-abort:
			return nil, false, errAborted
		}
	}
}

// closeIn stops accepting IN: queued and later data is credited and dropped.
func (ch *Channel) closeIn() {
	ch.mu.Lock()
	ch.inClosed = true
	n := 0
	for _, b := range ch.inQ {
		n += len(b)
	}
	ch.inQ = nil
	ch.mu.Unlock()
	ch.creditIn(n)
}

// creditIn returns n bytes of window to the host.
func (ch *Channel) creditIn(n int) {
	if n <= 0 {
		return
	}
	ch.mu.Lock()
	ch.inOwed -= int64(n)
	ch.mu.Unlock()
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(n))
	_ = ch.sendRaw(outFrame{buf: EncodeFrame(ch.id, KindCredit, b[:])}, false)
}
