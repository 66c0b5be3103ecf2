package agent

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

func TestIsLiveUserProcessReadsRealStatLines(t *testing.T) {
	self, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	if !isLiveUserProcess(string(self)) {
		t.Errorf("this test process counted as gone: %q", self)
	}
	// PID 2 is kthreadd wherever the test runs in the root PID namespace.
	if kthread, err := os.ReadFile("/proc/2/stat"); err == nil && isLiveUserProcess(string(kthread)) {
		t.Errorf("a kernel thread counted as a user process: %q", kthread)
	}
	if isLiveUserProcess("42 (a) b) Z 1 42 42 0 -1 4194304 0") {
		t.Error("a zombie counted as alive")
	}
	if !isLiveUserProcess("42 (a) b) S 1 42 42 0 -1 4194304 0") {
		t.Error("a sleeping process with ') ' in its name counted as gone")
	}
	for _, bad := range []string{"", "42 (x", "42 (x) S 1"} {
		if isLiveUserProcess(bad) {
			t.Errorf("malformed stat %q counted as alive", bad)
		}
	}
}

func TestUserProcessesLeftSeesAChild(t *testing.T) {
	dir := t.TempDir()
	if userProcessesLeft(dir) {
		t.Fatal("an empty proc directory has processes")
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	if !userProcessesLeft("/proc") {
		t.Fatal("a running child was not seen")
	}
}

func TestPowerOffRestartsWhereThereIsNoACPI(t *testing.T) {
	acpi := t.TempDir() // stands for /sys/firmware/acpi, read before /sys is unmounted
	cases := []struct {
		mode, acpi string
		want       int
	}{
		{"poweroff", acpi, unix.LINUX_REBOOT_CMD_POWER_OFF},
		{"poweroff", acpi + "/none", unix.LINUX_REBOOT_CMD_RESTART},
		{"reboot", acpi, unix.LINUX_REBOOT_CMD_RESTART},
	}
	for _, c := range cases {
		if got := rebootCmd(c.mode, c.acpi); got != c.want {
			t.Errorf("rebootCmd(%q, %q) = %#x, want %#x", c.mode, c.acpi, got, c.want)
		}
	}
}
