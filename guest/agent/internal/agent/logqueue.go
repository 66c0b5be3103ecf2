package agent

import (
	"io"
	"strconv"
	"sync"
)

// logQueueLines is how many console lines may wait to be written; past it
// lines are dropped and counted. A console write can wait for ever (guest root
// stopped the console's output with tcflow, or one big write holds its lock),
// and the loops that log must not wait with it: the vsock accept loop logs a
// refused connect, a port's reader a protocol error, a request its panic.
const logQueueLines = 256

// logQueue writes lines to w in order, from one goroutine of its own.
type logQueue struct {
	lines   chan string
	mu      sync.Mutex
	dropped int
}

func newLogQueue(w io.Writer) *logQueue {
	q := &logQueue{lines: make(chan string, logQueueLines)}
	go q.write(w)
	return q
}

// push never waits.
func (q *logQueue) push(line string) {
	select {
	case q.lines <- line:
	default:
		q.mu.Lock()
		q.dropped++
		q.mu.Unlock()
	}
}

func (q *logQueue) write(w io.Writer) {
	for line := range q.lines {
		q.mu.Lock()
		dropped := q.dropped
		q.dropped = 0
		q.mu.Unlock()
		if dropped > 0 {
			_, _ = io.WriteString(w, "isorun-agent: ("+strconv.Itoa(dropped)+
				" lines dropped: the console did not take them)\n")
		}
		_, _ = io.WriteString(w, line)
	}
}
