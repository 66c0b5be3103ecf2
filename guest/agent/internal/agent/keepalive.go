package agent

import "time"

// keepalivePayload is the EVENT every open request gets each keepalive interval; the
// host matches these exact bytes and never hands them to the request's consumer.
var keepalivePayload = []byte(`{"event":"alive"}`)

// The interval the host may ask for; 0 asks for none.
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

// opKeepalive starts the keepalives: {"op":"keepalive","interval_ms":N} answers
// {"ok":true,"interval_ms":<in effect>} (0: none). A request of its own, not a hello
// field: an agent from before keepalives refuses unknown hello fields but answers an
// unknown op with an error, which tells the host to expect none.
func opKeepalive(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op         string `json:"op"`
		IntervalMs int64  `json:"interval_ms"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	ch.closeIn()
	return ok("interval_ms", ch.c.startKeepalive(keepaliveInterval(r.IntervalMs)).Milliseconds()), nil
}

// startKeepalive tells the host, every interval, which requests the guest is still
// working on: a long command, a watch with nothing to report or a large remove sends
// nothing else for a long time, and the host must tell those from a guest that stopped
// answering. The first positive interval asked on a connection holds (a new host connection asks
// again); it returns the one in effect.
func (c *Conn) startKeepalive(every time.Duration) time.Duration {
	c.keepMu.Lock()
	defer c.keepMu.Unlock()
	if c.keepEvery == 0 && every > 0 {
		c.keepEvery = every
		go c.keepalive(every)
	}
	return c.keepEvery
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
