package agent

import (
	"io"
	"strconv"
	"sync/atomic"
	"time"
)

// logQueueLines is how many console lines may wait to be written; past it
// lines are dropped and counted. A console write can wait for ever (guest root
// stopped the console's output with tcflow, or one big write holds its lock),
// and the loops that log must not wait with it: the vsock accept loop logs a
// refused connect, a port's reader a protocol error, a request its panic.
const logQueueLines = 256

// logQueue writes lines to w in order, from one goroutine of its own.
type logQueue struct {
	lines     chan string
	dropped   atomic.Int64 // since the last line written
	unwritten atomic.Int64 // pushed, not yet written
}

func newLogQueue(w io.Writer) *logQueue {
	q := &logQueue{lines: make(chan string, logQueueLines)}
	go q.write(w)
	return q
}

// push never waits.
func (q *logQueue) push(line string) {
	q.unwritten.Add(1)
	select {
	case q.lines <- line:
	default:
		q.unwritten.Add(-1)
		q.dropped.Add(1)
	}
}

// flush waits, at most d, until the lines pushed so far have been written.
func (q *logQueue) flush(d time.Duration) {
	for deadline := time.Now().Add(d); q.unwritten.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

func (q *logQueue) write(w io.Writer) {
	for line := range q.lines {
		if dropped := q.dropped.Swap(0); dropped > 0 {
			_, _ = io.WriteString(w, "isorun-agent: ("+strconv.FormatInt(dropped, 10)+
				" lines dropped: the console did not take them)\n")
		}
		_, _ = io.WriteString(w, line)
		q.unwritten.Add(-1)
	}
}
