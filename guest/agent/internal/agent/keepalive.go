package agent

import "time"

// keepalivePayload is the EVENT every open request gets each keepalive interval; the
// host matches these exact bytes and never hands them to the request's consumer.
var keepalivePayload = []byte(`{"event":"alive"}`)

// The interval the host may ask for in hello; 0 turns keepalives off.
const (
	minKeepalive = 100 * time.Millisecond
	maxKeepalive = time.Minute
)

// keepaliveInterval clamps the host's request (in ms) to what the agent offers.
func keepaliveInterval(ms int64) time.Duration {
	if ms <= 0 {
		return 0
	}
	d := time.Duration(min(ms, int64(maxKeepalive/time.Millisecond))) * time.Millisecond
	return max(d, minKeepalive)
}

// startKeepalive tells the host, every interval, which requests the guest is still
// working on: a long command, a watch with nothing to report or a large remove sends
// nothing else for a long time, and the host must tell those from a guest that stopped
// answering. Once per connection; a new host connection asks again in its hello.
func (c *Conn) startKeepalive(every time.Duration) {
	if every <= 0 {
		return
	}
	c.keepOnce.Do(func() { go c.keepalive(every) })
}

func (c *Conn) keepalive(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		c.mu.Lock()
		open := make([]*Channel, 0, len(c.chans))
		for _, ch := range c.chans {
			open = append(open, ch)
		}
		c.mu.Unlock()
		for _, ch := range open {
			// A channel answered meanwhile refuses the frame: nothing follows a RESP.
			_ = ch.sendRaw(outFrame{buf: EncodeFrame(ch.id, KindEvent, keepalivePayload)}, false)
		}
	}
}
