package agent

import (
	"io"
	"testing"
	"time"
)

// alternate writes n one-byte runs, stdout and stderr in turn.
func alternate(r *Ring, n int) {
	for i := 0; i < n; i++ {
		st := uint8(streamOut)
		if i%2 == 1 {
			st = streamErr
		}
		r.Write(st, []byte{byte('a' + i%2)})
	}
}

// Output alternating a byte at a time keeps at most maxSegs runs (their tags
// would otherwise take 16 times the ring's bytes), the newest, each still
// read back with its own stream.
func TestRingBoundsItsRuns(t *testing.T) {
	r := NewRing(minRing)
	alternate(r, 3*r.maxSegs())
	r.Close()
	start, end := r.Bounds()
	if len(r.segs) != r.maxSegs() || end-start != int64(r.maxSegs()) {
		t.Fatalf("%d runs over [%d, %d) with a bound of %d", len(r.segs), start, end, r.maxSegs())
	}
	cur := r.Cursor(start, false)
	buf := make([]byte, 64)
	for off := start; ; off++ {
		n, st, lost, err := r.Next(cur, buf)
		if err == io.EOF {
			if off != end {
				t.Fatalf("EOF at %d, end %d", off, end)
			}
			return
		}
		want := uint8(streamOut)
		if off%2 == 1 {
			want = streamErr
		}
		if err != nil || lost != 0 || n != 1 || st != want || buf[0] != byte('a'+off%2) {
			t.Fatalf("at %d: n=%d st=%d lost=%d err=%v byte=%q", off, n, st, lost, err, buf[0])
		}
	}
}

// A lossless reader loses none of it: the writer waits for it instead.
func TestRingRunBoundWaitsForALosslessReader(t *testing.T) {
	r := NewRing(minRing)
	cur := r.Cursor(0, true)
	total := 3 * r.maxSegs()
	go func() { alternate(r, total); r.Close() }()
	buf := make([]byte, 64)
	got := 0
	for {
		n, _, lost, err := r.Next(cur, buf)
		if err == io.EOF {
			break
		}
		if err != nil || lost != 0 {
			t.Fatalf("after %d bytes: lost=%d err=%v", got, lost, err)
		}
		got += n
		if got%1000 == 0 {
			time.Sleep(time.Millisecond) // a slow reader
		}
	}
	if got != total {
		t.Fatalf("read %d of %d", got, total)
	}
}

// Dropping old runs does not copy the ones held (it once copied them all for
// each run dropped: quadratic in alternating output): counted in allocations,
// which that copy made one of per write.
func TestRingDropsRunsWithoutCopyingThem(t *testing.T) {
	r := NewRing(maxRing)
	alternate(r, 2*r.maxSegs()) // at the bound: each write drops a run
	i := 0
	b := []byte{'x'}
	allocs := testing.AllocsPerRun(20000, func() {
		r.Write(uint8(streamOut+uint8(i%2)), b)
		i++
	})
	if allocs > 0.01 {
		t.Fatalf("%.3f allocations per write with %d runs held", allocs, len(r.segs))
	}
}

// One write of more than the ring holds keeps its last cap bytes (it once
// kept others), and a lossless reader gets all of it, a ring's worth at a time.
func TestRingWriteLargerThanTheRing(t *testing.T) {
	data := make([]byte, 2*minRing+minRing/3)
	for i := range data {
		data[i] = byte(i % 251)
	}
	r := NewRing(minRing)
	r.Write(streamOut, data)
	r.Close()
	start, end := r.Bounds()
	cur := r.Cursor(start, false)
	got := make([]byte, 0, minRing)
	buf := make([]byte, 4096)
	for {
		n, _, _, err := r.Next(cur, buf)
		if err == io.EOF {
			break
		}
		got = append(got, buf[:n]...)
	}
	if end != int64(len(data)) || string(got) != string(data[len(data)-minRing:]) {
		t.Fatalf("held [%d, %d): %d bytes, the tail of what was written: %v",
			start, end, len(got), string(got) == string(data[len(data)-minRing:]))
	}

	r = NewRing(minRing)
	lossless := r.Cursor(0, true)
	go func() { r.Write(streamOut, data); r.Close() }()
	got = got[:0]
	for {
		n, _, lost, err := r.Next(lossless, buf)
		if err == io.EOF {
			break
		}
		if err != nil || lost != 0 {
			t.Fatalf("after %d bytes: lost=%d err=%v", len(got), lost, err)
		}
		got = append(got, buf[:n]...)
	}
	if string(got) != string(data) {
		t.Fatalf("a lossless reader got %d bytes of %d, or others", len(got), len(data))
	}
}
