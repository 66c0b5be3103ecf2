package agent

import (
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// A timeout's SIGKILL, 2 s on, after the leader is reaped and its group
// gone (its one holder of the output left with setsid), must not reach a
// new process that got the old pid (and so leads a group of that number).
func TestAKillAfterTheLeaderIsReapedSparesANewcomerWithItsPid(t *testing.T) {
	dir := t.TempDir()
	esc := dir + "/esc"
	t.Cleanup(func() { killPid(t, esc) })
	c := newClient(t, nil)
	start := time.Now()
	r := c.call(1, map[string]any{"op": "exec", "timeout_ms": 300,
		"cmd": "setsid sh -c 'echo $$ > " + esc + "; exec sleep 30' & exec sleep 5"})
	old := int(num(r.events[0]["pid"]))
	t.Logf("RESP after %v timed_out=%v old pid %d", time.Since(start), r.resp["timed_out"], old)
	var victim int
	var vid string
	for i := 0; i < 50 && victim != old; i++ {
		if victim > 0 {
			_ = syscall.Kill(victim, syscall.SIGKILL)
		}
		err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(old-1)), 0)
		r := c.call(uint32(10+i), map[string]any{"op": "exec", "argv": []string{"sleep", "30"}, "background": true})
		victim, vid = int(num(r.resp["pid"])), r.resp["proc_id"].(string)
		v := victim
		t.Cleanup(func() { _ = syscall.Kill(v, syscall.SIGKILL) })
		if i < 3 {
			t.Logf("try %d: err %v victim %d", i, err, victim)
		}
	}
	if victim != old {
		t.Skip("could not reuse the pid")
	}
	t.Cleanup(func() { _ = syscall.Kill(victim, syscall.SIGKILL) })
	t.Logf("unrelated background exec %s got pid/pgid %d at %v", vid, victim, time.Since(start))
	time.Sleep(2*time.Second + time.Second) // past the timeout's kill grace
	if !alive(victim) {
		t.Errorf("unrelated process %d (%s) killed by the old exec's timeout", victim, vid)
	}
}

// On a PTY, TIOCINQ counts only the line discipline's buffer, not the tty
// buffers: a host slow to credit past drainCap must still get all of the
// process's own output while a HUP-ignoring member holds the terminal.
func TestAPTYExecKeepsItsOutputForASlowHost(t *testing.T) {
	pidf := t.TempDir() + "/holder"
	t.Cleanup(func() { killPid(t, pidf) })
	c := newClient(t, nil)
	c.credit = false
	n := initialWindow + 65536 + 11000
	c.req(1, map[string]any{"op": "exec", "pty": map[string]any{}, "ring_bytes": 65536,
		"cmd": "trap '' HUP; sh -c 'echo $$ > " + pidf + "; exec sleep 30' & head -c " + strconv.Itoa(n) + " /dev/zero"})
	got := 0
	for got < initialWindow {
		if f := c.next(1, 5*time.Second); f.Kind == KindOut {
			got += len(f.Payload)
		}
	}
	time.Sleep(drainCap + 500*time.Millisecond)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		c.send(1, KindCredit, be32(2048))
		time.Sleep(100 * time.Millisecond)
		for more := true; more; {
			select {
			case f := <-c.q(1):
				switch f.Kind {
				case KindOut:
					got += len(f.Payload)
				case KindResp:
					t.Logf("RESP %s", f.Payload)
					if got != n {
						t.Fatalf("got %d of %d bytes: %d of the process's own output lost", got, n, n-got)
					}
					return
				}
			default:
				more = false
			}
		}
	}
	t.Fatal("no RESP")
}

func cpuSelf() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A group member that writes without pause after the RESP is discarded,
// not read flat out (it would double a runaway job's cost).
func TestAWriterLeftBehindDoesNotKeepTheAgentBusy(t *testing.T) {
	pidf := t.TempDir() + "/yes"
	t.Cleanup(func() { killPid(t, pidf) })
	c := newClient(t, nil)
	c.call(1, map[string]any{"op": "exec", "cmd": "sh -c 'echo $$ > " + pidf + "; exec yes' & sleep 0.1; echo started"})
	time.Sleep(200 * time.Millisecond)
	c0, w0 := cpuSelf(), time.Now()
	time.Sleep(2 * time.Second)
	burn := float64(cpuSelf()-c0) / float64(time.Since(w0))
	t.Logf("agent CPU after the RESP: %.0f%% of a core; yes alive=%v", 100*burn, alive(pidFrom(pidf)))
	if burn > 0.2 {
		t.Errorf("agent burns %.0f%% of a core discarding an orphaned writer", 100*burn)
	}
}

// A process left behind that reads stdin and holds stdout gets EOF once the
// exec is over (else neither it nor the agent's pipes ever end).
func TestAProcessLeftBehindGetsEOFOnStdin(t *testing.T) {
	pidf := t.TempDir() + "/cat"
	t.Cleanup(func() { killPid(t, pidf) })
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "stdin": true,
		"cmd": "exec 3<&0; cat <&3 & echo $! > " + pidf + "; echo started"})
	t.Logf("resp %v out %q", r.resp, r.out)
	time.Sleep(3 * time.Second)
	if alive(pidFrom(pidf)) {
		t.Errorf("cat %d still blocked on stdin 3 s after the RESP: agent holds the stdin pipe until the output drains", pidFrom(pidf))
	}
}
