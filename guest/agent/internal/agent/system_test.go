package agent

import (
	"math"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// metrics answers every figure or an error naming what it could not read: a
// guest program that unmounted /proc (or mounted over it) in the agent's mount
// namespace made it answer ok with no figures, and the host then failed with
// "guest field missing".
func TestMetricsWithoutProcIsAnErrorNamingIt(t *testing.T) {
	c := newClient(t, nil)
	if os.Getenv("ISORUN_TEST_NO_PROC") != "1" {
		r := c.call(1, map[string]any{"op": "metrics"})
		for _, k := range []string{"mem_total_bytes", "mem_available_bytes", "load1", "load5",
			"load15", "procs_running", "uptime_s"} {
			if _, found := r.resp[k]; !found {
				t.Fatalf("metrics without %s: %v", k, r.resp)
			}
		}
		cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs none /proc && exec "$0" -test.run='^TestMetricsWithoutProcIsAnErrorNamingIt$' -test.count=1`,
			os.Args[0])
		cmd.Env = append(os.Environ(), "ISORUN_TEST_NO_PROC=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("with /proc gone: %v\n%s", err, out)
		}
		return
	}
	r := c.call(1, map[string]any{"op": "metrics"})
	msg, _ := r.resp["error"].(string)
	if r.resp["ok"] != false || r.resp["code"] != "io" || !strings.Contains(msg, "/proc/meminfo") {
		t.Fatalf("metrics with /proc gone answered %v", r.resp)
	}
}

// A clock outside 2000-2200 is refused naming unix_ns (one the kernel cannot
// hold was a bare "invalid argument", and the year 2150 was set). Checked
// without setting anything: this test runs on the host.
func TestSetClockOutOfRangeNamesUnixNs(t *testing.T) {
	for _, v := range []int64{math.MaxInt64, 7_258_118_401 * 1e9, 1,
		946_684_799 * 1e9, -1} {
		err := checkClock(&v)
		if err == nil || err.Code != "invalid" || !strings.Contains(err.Msg, "unix_ns") {
			t.Fatalf("unix_ns=%d: %v", v, err)
		}
	}
	for _, v := range []int64{946_684_800 * 1e9, 1_796_000_000 * 1e9, 7_258_118_400 * 1e9} {
		if err := checkClock(&v); err != nil {
			t.Fatalf("unix_ns=%d refused: %v", v, err)
		}
	}
	if checkClock(nil) == nil {
		t.Fatal("a missing unix_ns was taken")
	}
	// through the op, with a value the kernel refuses anyway (safe on the host)
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "set_clock", "unix_ns": int64(math.MaxInt64)})
	msg, _ := r.resp["error"].(string)
	if r.resp["ok"] != false || r.resp["code"] != "invalid" || !strings.Contains(msg, "unix_ns") {
		t.Fatalf("set_clock unix_ns=MaxInt64 answered %v", r.resp)
	}
}

// One shutdown at a time: a second (of any mode) is busy, not another power-off
// racing the first to reboot(2); health says a shutdown is under way.
func TestASecondShutdownIsBusyAndHealthSaysSo(t *testing.T) {
	srv := NewServer(time.Now())
	var calls atomic.Int32
	srv.Shutdown = func(mode string) { calls.Add(1); select {} } // powerOff never returns
	c := newClient(t, srv)
	first := c.call(1, map[string]any{"op": "shutdown", "mode": "poweroff"})
	second := c.call(2, map[string]any{"op": "shutdown", "mode": "reboot"})
	health := c.call(3, map[string]any{"op": "health"})
	time.Sleep(100 * time.Millisecond)
	if first.resp["ok"] != true {
		t.Fatalf("first shutdown: %v", first.resp)
	}
	if second.resp["ok"] != false || second.resp["code"] != "busy" ||
		!strings.Contains(second.resp["error"].(string), "poweroff") {
		t.Fatalf("second shutdown: %v", second.resp)
	}
	if health.resp["ok"] != true || health.resp["shutting_down"] != "poweroff" {
		t.Fatalf("health during shutdown: %v", health.resp)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("power-off ran %d times", n)
	}
}
