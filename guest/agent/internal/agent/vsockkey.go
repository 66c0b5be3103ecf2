package agent

import (
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"
)

// vsockKeyBytes is the size of the key a vsock host proves it has.
const vsockKeyBytes = 32

// vsockKey is the secret a vsock peer must present in its first hello. The
// host's side of vsock has no access control: every local user of the host
// can connect to a guest's port, and only the host (CID 2) is told apart from
// a guest process. The key comes over the virtio-serial port, whose socket
// only the host's daemon can open, so holding it proves the peer is that host.
type vsockKey struct {
	mu  sync.Mutex
	key []byte // nil until the serial port's host sets it
}

// parseVsockKey decodes the key as the host sends it: 64 hex digits.
func parseVsockKey(s string) ([]byte, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != vsockKeyBytes {
		return nil, fmt.Errorf("the vsock key is not %d hex digits", 2*vsockKeyBytes)
	}
	return b, nil
}

func (k *vsockKey) set(b []byte) {
	k.mu.Lock()
	k.key = b
	k.mu.Unlock()
}

// admit checks a vsock connection's first frame: a hello carrying the key.
func (k *vsockKey) admit(f Frame) error {
	k.mu.Lock()
	want := k.key
	k.mu.Unlock()
	if want == nil {
		return fmt.Errorf("%w: a vsock host before the serial port's host set its key", ErrViolation)
	}
	var hello struct {
		Op  string `json:"op"`
		Key string `json:"key"`
	}
	if f.Kind != KindReq || f.Chan != 0 || json.Unmarshal(f.Payload, &hello) != nil ||
		hello.Op != "hello" {
		return fmt.Errorf("%w: a vsock host must say hello first, with its key", ErrViolation)
	}
	got, err := hex.DecodeString(hello.Key)
	if err != nil || subtle.ConstantTimeCompare(got, want) != 1 {
		return fmt.Errorf("%w: a vsock hello without the host's key", ErrViolation)
	}
	return nil
}

// opSetVsockKey: {"op":"set_vsock_key","key":"<64 hex digits>"}, on the serial
// port only. The newest key counts.
func opSetVsockKey(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op  string `json:"op"`
		Key string `json:"key"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if ch.c.overVsock() {
		return nil, errf("invalid", "the vsock key is set over the serial port only")
	}
	key, err := parseVsockKey(r.Key)
	if err != nil {
		return nil, errf("invalid", "%v", err)
	}
	s.vsockKey.set(key)
	return ok(), nil
}
