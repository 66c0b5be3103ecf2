package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	buf.Write(EncodeFrame(7, KindOut, []byte("abc")))
	buf.Write(EncodeFrame(0, KindEOF, nil))
	fr := NewFrameReader(&buf)
	f, err := fr.Read()
	if err != nil || f.Chan != 7 || f.Kind != KindOut || string(f.Payload) != "abc" {
		t.Fatalf("%v %v", f, err)
	}
	f, err = fr.Read()
	if err != nil || f.Kind != KindEOF || len(f.Payload) != 0 {
		t.Fatalf("%v %v", f, err)
	}
}

func expectDrop(t *testing.T, raw []byte) {
	t.Helper()
	c := newClient(t, nil)
	c.conn.Write(raw)
	select {
	case err := <-c.done:
		if !errors.Is(err, ErrViolation) {
			t.Fatalf("ServeConn returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("connection not dropped")
	}
}

func TestOversizedFrameDropsConnection(t *testing.T) {
	var h [9]byte
	binary.BigEndian.PutUint32(h[0:], MaxPayload+1)
	h[8] = KindIn
	expectDrop(t, h[:])
}

func TestUnknownKindDropsConnection(t *testing.T) {
	expectDrop(t, EncodeFrame(1, 42, []byte("x")))
	expectDrop(t, EncodeFrame(1, 0, nil))
}

func TestBadCreditDropsConnection(t *testing.T) {
	expectDrop(t, EncodeFrame(1, KindCredit, []byte{1, 2}))
}

func TestRingWrapAndSegments(t *testing.T) {
	r := NewRing(minRing)
	chunk := bytes.Repeat([]byte("x"), 30000)
	for i := 0; i < 5; i++ {
		st := uint8(streamOut)
		if i%2 == 1 {
			st = streamErr
		}
		r.Write(st, chunk)
	}
	r.Close()
	start, end := r.Bounds()
	if end != 150000 || start != 150000-minRing {
		t.Fatalf("bounds %d %d", start, end)
	}
	cur := r.Cursor(0, false)
	buf := make([]byte, 100000)
	n, _, lost, err := r.Next(cur, buf)
	if n != 0 || lost != start || err != nil {
		t.Fatalf("n=%d lost=%d err=%v", n, lost, err)
	}
	total := 0
	for {
		n, st, _, err := r.Next(cur, buf)
		if err != nil {
			break
		}
		off := cur.off - int64(n)
		if want := uint8(streamOut); (off/30000)%2 == 1 {
			want = streamErr
			if st != want {
				t.Fatalf("stream %d at %d", st, off)
			}
		} else if st != want {
			t.Fatalf("stream %d at %d", st, off)
		}
		total += n
	}
	if int64(total) != end-start {
		t.Fatalf("read %d", total)
	}
}
