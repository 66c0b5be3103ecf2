package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Frame kinds (docs/protocol.md, "Frame").
const (
	KindReq    = 1
	KindResp   = 2
	KindEvent  = 3
	KindOut    = 4
	KindErr    = 5
	KindIn     = 6
	KindEOF    = 7
	KindCredit = 8
	KindCancel = 9
)

const (
	headerSize = 9
	// MaxPayload is the largest payload either side may send.
	MaxPayload = 65536
	// maxWrite is the largest single write() to the port: the virtio-console
	// driver caps one write at 32 KiB and QEMU drops whole writes while no
	// host is connected, so one frame per write keeps frames untorn.
	maxWrite = 32768
	// MaxOutPayload is the largest payload the guest sends.
	MaxOutPayload = maxWrite - headerSize
	// initialWindow is each side's starting send window per channel.
	initialWindow = 262144
)

// ErrViolation marks a protocol violation: the connection is dropped.
var ErrViolation = errors.New("protocol violation")

// Frame is one decoded frame.
type Frame struct {
	Chan    uint32
	Kind    uint8
	Payload []byte
}

// FrameReader decodes frames from a byte stream.
type FrameReader struct {
	r   io.Reader
	hdr [headerSize]byte
	max uint32 // the largest payload taken (0: MaxPayload)
}

// NewFrameReader wraps r (callers pass a buffered reader).
func NewFrameReader(r io.Reader) *FrameReader { return &FrameReader{r: r} }

// Read returns the next frame. Oversized or unknown-kind frames yield an
// error wrapping ErrViolation.
func (fr *FrameReader) Read() (Frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return Frame{}, err
	}
	n := binary.BigEndian.Uint32(fr.hdr[0:4])
	f := Frame{Chan: binary.BigEndian.Uint32(fr.hdr[4:8]), Kind: fr.hdr[8]}
	if n > MaxPayload || (fr.max > 0 && n > fr.max) {
		return f, fmt.Errorf("%w: payload length %d", ErrViolation, n)
	}
	if f.Kind < KindReq || f.Kind > KindCancel {
		return f, fmt.Errorf("%w: unknown kind %d", ErrViolation, f.Kind)
	}
	if n > 0 {
		f.Payload = make([]byte, n)
		if _, err := io.ReadFull(fr.r, f.Payload); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return f, err
		}
	}
	return f, nil
}

// putHeader fills the 9-byte header at the start of buf.
func putHeader(buf []byte, ch uint32, kind uint8, n int) {
	binary.BigEndian.PutUint32(buf[0:4], uint32(n))
	binary.BigEndian.PutUint32(buf[4:8], ch)
	buf[8] = kind
}

// EncodeFrame returns header+payload in one buffer (for one write()).
func EncodeFrame(ch uint32, kind uint8, payload []byte) []byte {
	buf := make([]byte, headerSize+len(payload))
	putHeader(buf, ch, kind, len(payload))
	copy(buf[headerSize:], payload)
	return buf
}
