package agent

import (
	"errors"
	"io"
	"sort"
	"sync"
)

// Stream tags for ring segments.
const (
	streamOut = KindOut
	streamErr = KindErr
)

const minRing = 64 << 10

var errDetached = errors.New("cursor detached")

type segment struct {
	start  int64
	stream uint8
}

// Ring keeps the last cap bytes of a process's output (stdout and stderr
// interleaved, each run tagged) and wakes readers. Offsets count all output
// since the process started. Lossless cursors (a foreground exec) make the
// writer wait instead of overwriting bytes they have not read; others just
// lose the oldest bytes and are told how many.
type Ring struct {
	mu       sync.Mutex
	cond     sync.Cond
	buf      []byte // grows up to cap, then wraps at offset % cap
	cap      int64
	start    int64 // oldest offset still held
	end      int64 // next offset to write
	segs     []segment
	closed   bool
	done     chan struct{} // closed by Close
	blocking map[*Cursor]struct{}
}

// Cursor is one reader's position in a Ring.
type Cursor struct {
	off      int64
	blocking bool
	detached bool
}

// NewRing makes a ring of capacity size (at least 64 KiB).
func NewRing(size int64) *Ring {
	if size < minRing {
		size = minRing
	}
	r := &Ring{cap: size, blocking: map[*Cursor]struct{}{}, done: make(chan struct{})}
	r.cond.L = &r.mu
	return r
}

// Write appends p, waiting for lossless cursors to make room; more than the
// ring holds goes a ring's worth at a time.
func (r *Ring) Write(stream uint8, p []byte) {
	for len(p) > 0 {
		n := min(int64(len(p)), r.cap)
		r.write(stream, p[:n])
		p = p[n:]
	}
}

// write appends p (0 < len(p) <= cap).
func (r *Ring) write(stream uint8, p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.mustWait(stream, int64(len(p))) {
		r.cond.Wait()
	}
	start := r.startAfter(stream, int64(len(p)))
	r.put(p)
	if r.newRun(stream) {
		r.segs = append(r.segs, segment{start: r.end, stream: stream})
	}
	r.end += int64(len(p))
	if start > r.start {
		r.start = start
		r.dropSegs()
	}
	r.cond.Broadcast()
}

// maxSegs bounds the runs a ring tags (16 bytes each): output alternating
// between stdout and stderr a byte at a time would otherwise take 16 times
// the ring's size. Past it the oldest runs go, bytes and all.
func (r *Ring) maxSegs() int { return int(max(4096, r.cap/64)) }

func (r *Ring) newRun(stream uint8) bool {
	n := len(r.segs)
	return n == 0 || r.segs[n-1].stream != stream
}

// startAfter is the oldest offset the ring will hold once n bytes of stream
// are written: at most cap bytes, in at most maxSegs runs.
func (r *Ring) startAfter(stream uint8, n int64) int64 {
	start := max(r.start, r.end+n-r.cap)
	runs := len(r.segs)
	if r.newRun(stream) {
		runs++
	}
	if drop := runs - r.maxSegs(); drop > 0 {
		start = max(start, r.segs[drop].start) // drop < len(r.segs): maxSegs > 1
	}
	return start
}

func (r *Ring) mustWait(stream uint8, n int64) bool {
	if len(r.blocking) == 0 {
		return false
	}
	start := r.startAfter(stream, n)
	for c := range r.blocking {
		if c.off < start {
			return true
		}
	}
	return false
}

// put copies p at r.end, growing the buffer until it reaches cap.
func (r *Ring) put(p []byte) {
	if int64(len(r.buf)) < r.cap {
		need := r.end + int64(len(p))
		if need <= r.cap {
			if need > int64(cap(r.buf)) {
				nc := max(int64(cap(r.buf))*2, need, 4096)
				nb := make([]byte, len(r.buf), min(nc, r.cap))
				copy(nb, r.buf)
				r.buf = nb
			}
			r.buf = append(r.buf, p...)
			return
		}
		nb := make([]byte, r.cap)
		copy(nb, r.buf)
		r.buf = nb
	}
	i := r.end % r.cap
	n := copy(r.buf[i:], p)
	copy(r.buf, p[n:])
}

func (r *Ring) dropSegs() {
	// keep the segment containing r.start. Reslicing, not copying: a copy per
	// dropped run made alternating output quadratic in the runs held; append
	// moves the live runs to a new array once the old one's tail is used up.
	i := sort.Search(len(r.segs), func(i int) bool { return r.segs[i].start > r.start }) - 1
	if i > 0 {
		r.segs = r.segs[i:]
	}
}

// Close marks the output complete; readers get io.EOF after the last byte.
func (r *Ring) Close() {
	r.mu.Lock()
	if !r.closed {
		r.closed = true
		close(r.done)
	}
	r.cond.Broadcast()
	r.mu.Unlock()
}

// Held is the memory the ring's buffer takes.
func (r *Ring) Held() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return int64(cap(r.buf))
}

// Release frees the buffer of a complete ring no lossless reader still needs;
// later readers are told the bytes are lost. Returns the bytes freed.
func (r *Ring) Release() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed || len(r.blocking) > 0 {
		return 0
	}
	n := int64(cap(r.buf))
	r.buf, r.segs, r.start = nil, nil, r.end
	r.cond.Broadcast()
	return n
}

// Done is closed once the output is complete (Close).
func (r *Ring) Done() <-chan struct{} { return r.done }

// Cursor registers a reader at off.
func (r *Ring) Cursor(off int64, blocking bool) *Cursor {
	c := &Cursor{off: off, blocking: blocking}
	if blocking {
		r.mu.Lock()
		r.blocking[c] = struct{}{}
		r.mu.Unlock()
	}
	return c
}

// Detach releases a cursor: a blocked Next returns errDetached and the
// writer no longer waits for it.
func (r *Ring) Detach(c *Cursor) {
	r.mu.Lock()
	c.detached = true
	delete(r.blocking, c)
	r.cond.Broadcast()
	r.mu.Unlock()
}

// Bounds returns the held range [start, end).
func (r *Ring) Bounds() (int64, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.start, r.end
}

// Next waits for data at c and copies up to len(dst) bytes of one stream.
// If c fell behind the ring, it jumps to the start and returns lost > 0
// with n == 0. Returns io.EOF after the last byte of a closed ring.
func (r *Ring) Next(c *Cursor, dst []byte) (n int, stream uint8, lost int64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if c.detached {
			return 0, 0, 0, errDetached
		}
		if c.off < r.start {
			lost = r.start - c.off
			c.off = r.start
			return 0, 0, lost, nil
		}
		if c.off < r.end {
			break
		}
		if r.closed {
			return 0, 0, 0, io.EOF
		}
		r.cond.Wait()
	}
	i := sort.Search(len(r.segs), func(i int) bool { return r.segs[i].start > c.off }) - 1
	segEnd := r.end
	if i+1 < len(r.segs) {
		segEnd = r.segs[i+1].start
	}
	want := min(int64(len(dst)), segEnd-c.off)
	pos := c.off % r.cap
	n = copy(dst[:want], r.buf[pos:])
	if int64(n) < want {
		n += copy(dst[n:want], r.buf)
	}
	c.off += int64(n)
	if c.blocking {
		r.cond.Broadcast()
	}
	return n, r.segs[i].stream, 0, nil
}
