package agent

import (
	"syscall"
	"testing"
)

// Each job a command leaves running holds two of the agent's fds (its output pipes)
// until it ends: at the kernel's limit for init, about 2,000 of them made every exec fail
// with "pipe2: too many open files". The agent raises its limit when it runs out.
func TestExecsGoOnWhenJobsLeftBehindUseUpTheFileLimit(t *testing.T) {
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	low := syscall.Rlimit{Cur: 96, Max: orig.Max} // the hard one stays: raising it takes a capability
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Skip("cannot lower the open files limit:", err)
	}
	t.Cleanup(func() {
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig)
		raisedOpenFiles.Store(false)
	})
	c := newClient(t, nil)
	for i := 0; i < 60; i++ { // two fds each: 120 > 96
		r := c.call(uint32(i+1), map[string]any{"op": "exec", "cmd": "sleep 5 & echo started"})
		if num(r.resp["exit_code"]) != 0 || string(r.out) != "started\n" {
			t.Fatalf("exec %d: resp %v out %q err %q", i, r.resp, r.out, r.err)
		}
	}
}
