package agent

import (
	"bytes"
	"fmt"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// A member of the command's process group that ignores SIGTERM and does not
// hold the output open outlived a kill and a timeout: SIGKILL went only to
// what still ran or wrote. It gets SIGKILL after the grace now.
const termIgnoringChild = "(trap '' TERM; exec sleep 300) </dev/null >/dev/null 2>&1 & echo $! > "

// waitGoneOrFail waits up to d for the pid a shell wrote to path to be gone.
func waitGoneOrFail(t *testing.T, path string, d time.Duration) {
	t.Helper()
	pid := 0
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if pid = pidFrom(path); pid > 0 && !alive(pid) {
			return
		}
	}
	defer killPid(t, path)
	t.Fatalf("process %d (from %s) still runs %v on", pid, path, d)
}

func TestKillReachesAGroupMemberThatIgnoresTerm(t *testing.T) {
	c := newClient(t, nil)
	pidf := t.TempDir() + "/pid"
	r := c.call(1, map[string]any{"op": "exec", "cmd": termIgnoringChild + pidf + "; sleep 300", "background": true})
	id := r.resp["proc_id"].(string)
	for pidFrom(pidf) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	r = c.call(2, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 300})
	if num(r.resp["signal"]) != 15 {
		t.Fatalf("kill: %v", r.resp)
	}
	waitGoneOrFail(t, pidf, 3*time.Second)
}

func TestTimeoutReachesAGroupMemberThatIgnoresTerm(t *testing.T) {
	c := newClient(t, nil)
	pidf := t.TempDir() + "/pid"
	r := c.call(1, map[string]any{"op": "exec", "cmd": termIgnoringChild + pidf + "; sleep 300", "timeout_ms": 300})
	if r.resp["timed_out"] != true {
		t.Fatalf("exec: %v", r.resp)
	}
	waitGoneOrFail(t, pidf, killGraceSecs+3*time.Second)
}

// An interactive shell on a terminal runs each job in a process group of its
// own; killing the shell ends its jobs too (they were left running).
func TestKillOfATerminalShellEndsItsJobs(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	c := newClient(t, nil)
	pidf := t.TempDir() + "/pid"
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"bash", "--norc", "-i"},
		"pty": map[string]any{}, "background": true})
	id := r.resp["proc_id"].(string)
	c.req(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true, "output": false})
	c.send(2, KindIn, []byte("sleep 300 & echo $! > "+pidf+"\n"))
	for end := time.Now().Add(10 * time.Second); pidFrom(pidf) == 0 && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	c.call(3, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 300})
	waitGoneOrFail(t, pidf, 3*time.Second)
}

// A stopped process that handles SIGTERM gets to (it is resumed), rather than
// SIGKILL after the whole grace: SIGTERM stayed pending while it was stopped.
func TestKillOfAStoppedProcessLetsItHandleTerm(t *testing.T) {
	c := newClient(t, nil)
	armed := t.TempDir() + "/armed"
	r := c.call(1, map[string]any{"op": "exec", "cmd": "trap 'exit 3' TERM; touch " + armed + "; while :; do sleep 0.1; done",
		"background": true})
	id := r.resp["proc_id"].(string)
	waitUntil(t, "the TERM trap is set", 10*time.Second, func() bool { return fileExists(armed) })
	c.call(2, map[string]any{"op": "signal", "proc_id": id, "signal": int(syscall.SIGSTOP)})
	start := time.Now()
	r = c.call(3, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 5000})
	if num(r.resp["exit_code"]) != 3 || time.Since(start) > 3*time.Second {
		t.Fatalf("after %v: %v", time.Since(start), r.resp)
	}
}

// A signal to a terminal's shell reaches the job in its foreground, as the
// key would: ^C stops `sleep 30` (it reached only the shell, which waited on).
func TestASignalToATerminalReachesItsForegroundJob(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"bash", "--norc", "-i"},
		"pty": map[string]any{}, "background": true})
	id := r.resp["proc_id"].(string)
	defer c.call(9, map[string]any{"op": "kill", "proc_id": id, "grace_ms": 0})
	c.req(2, map[string]any{"op": "attach", "proc_id": id, "stdin": true})
	c.send(2, KindIn, []byte("sleep 30; echo AFTER\n"))
	var out []byte
	readUntil := func(want string, d time.Duration) bool {
		for end := time.Now().Add(d); time.Now().Before(end); {
			select {
			case f := <-c.q(2):
				if f.Kind == KindOut {
					out = append(out, f.Payload...)
				}
				if bytes.Contains(out, []byte(want)) {
					return true
				}
			case <-time.After(50 * time.Millisecond):
			}
		}
		return false
	}
	bashPid := int(num(r.resp["pid"]))
	p := c.srv.Procs.Get(id)
	waitUntil(t, "sleep is in the terminal's foreground", 10*time.Second, func() bool {
		fg := p.foregroundGroup()
		return fg != 0 && fg != bashPid
	})
	c.call(3, map[string]any{"op": "signal", "proc_id": id, "signal": int(syscall.SIGINT)})
	c.send(2, KindIn, []byte("echo MA''RK\n"))
	// AFTER only where the terminal echoes the line typed, never on a line of its own
	if !readUntil("MARK\r\n", 5*time.Second) || bytes.Contains(out, []byte("\nAFTER")) ||
		bytes.Contains(out, []byte("\rAFTER")) {
		t.Fatalf("output %q", out)
	}
}

// leaverScript ignores SIGTERM, leaves a child in its own process group and
// moves itself into the group of pid other (any group of its session): a
// signal to its group reached the child only, and it ran on.
func leaverScript(other any) []string {
	return []string{"perl", "-e", fmt.Sprintf(`$SIG{TERM}="IGNORE"; `+
		`if (fork()==0) { sleep 60; exit } setpgrp(0, %v) or die "setpgrp: $!"; sleep 60`, other)}
}

func TestATimeoutReachesAProcessThatLeftItsGroup(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "sleep 60", "background": true})
	defer c.call(50, map[string]any{"op": "kill", "proc_id": r.resp["proc_id"], "grace_ms": 0})
	c.req(2, map[string]any{"op": "exec", "argv": leaverScript(r.resp["pid"]), "timeout_ms": 300})
	done := make(chan *result, 1)
	go func() { done <- c.wait(2, 30*time.Second) }()
	select {
	case r := <-done:
		if r.resp["timed_out"] != true || num(r.resp["signal"]) != 9 {
			t.Fatalf("resp %v stderr %q", r.resp, r.err)
		}
	case <-time.After(8 * time.Second):
		t.Fatalf("timeout_ms 300, grace 2 s: no answer within 8 s")
	}
}

func TestKillReachesAProcessThatLeftItsGroup(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "sleep 60", "background": true})
	defer c.call(50, map[string]any{"op": "kill", "proc_id": r.resp["proc_id"], "grace_ms": 0})
	r = c.call(2, map[string]any{"op": "exec", "argv": leaverScript(r.resp["pid"]), "background": true})
	pid := int(num(r.resp["pid"]))
	defer syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // a failed test's leftover
	// once it has left its group
	waitUntil(t, "the process in another group", 5*time.Second, func() bool {
		g, err := syscall.Getpgid(pid)
		return err == nil && g != pid
	})
	c.req(3, map[string]any{"op": "kill", "proc_id": r.resp["proc_id"], "grace_ms": 0})
	done := make(chan *result, 1)
	go func() { done <- c.wait(3, 30*time.Second) }()
	select {
	case r := <-done:
		if num(r.resp["signal"]) != 9 {
			t.Fatalf("kill: %v", r.resp)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("kill grace_ms 0: no answer within 5 s, pid %d alive: %v", pid, alive(pid))
	}
}
