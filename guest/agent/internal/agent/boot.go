package agent

import (
	"maps"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// bootClock records when each boot step ended, in ms since the agent started,
// and the guest's uptime at that start (the kernel's boot plus the Go
// runtime's own start).
type bootClock struct {
	mu    sync.Mutex
	start time.Time
	ms    map[string]int64
}

func newBootClock(start time.Time) *bootClock {
	return &bootClock{start: start, ms: map[string]int64{
		"agent_start_uptime": uptimeMS() - time.Since(start).Milliseconds()}}
}

// Mark records that step ended now.
func (b *bootClock) Mark(step string) {
	b.mu.Lock()
	b.ms[step] = time.Since(b.start).Milliseconds()
	b.mu.Unlock()
	trace("%s", step)
}

// Snapshot copies the times so far (nil for a nil clock).
func (b *bootClock) Snapshot() map[string]int64 {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.ms)
}

// uptimeMS is the guest's CLOCK_MONOTONIC: the time since the kernel started.
func uptimeMS() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Sec*1000 + ts.Nsec/1_000_000
}
