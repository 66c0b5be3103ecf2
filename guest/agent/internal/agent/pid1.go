package agent

import (
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// reserveStdFds makes sure fds 0-2 are open before anything else opens a
// file: without /dev/console in the initramfs the kernel starts init with
// them closed, and a later open (even the runtime's epoll fd) would land
// on 0-2 and be clobbered when the console is attached.
func reserveStdFds() {
	for fd := 0; fd < 3; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == unix.EBADF {
			_, _ = unix.Open("/", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		}
	}
}

type mountSpec struct {
	src, dst, fstype string
	flags            uintptr
	data             string
	mode             os.FileMode
}

// baseMounts are the kernel filesystems every guest needs.
var baseMounts = []mountSpec{
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	// Container runtimes in the guest (podman, runc, docker) expect the
	// unified hierarchy here, as systemd would have mounted it.
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate", 0o555},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "ptmxmode=0666,mode=0620,gid=5", 0o755},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"run", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
	{"tmp", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
}

// initSystem performs PID-1 setup and returns the console for log output.
func initSystem() *os.File {
	var failed []string
	for _, m := range baseMounts {
		_ = os.MkdirAll(m.dst, m.mode)
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && err != unix.EBUSY {
			failed = append(failed, m.dst+": "+err.Error())
		}
	}
	console, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
	if err == nil {
		if null, err := os.OpenFile("/dev/null", os.O_RDWR, 0); err == nil {
			_ = unix.Dup3(int(null.Fd()), 0, 0)
			null.Close()
		}
		_ = unix.Dup3(int(console.Fd()), 1, 0)
		_ = unix.Dup3(int(console.Fd()), 2, 0)
	}
	if _, err := os.Lstat("/dev/ptmx"); err != nil {
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	_ = unix.Sethostname([]byte("isorun"))
	for _, f := range failed {
		os.Stderr.WriteString("isorun-agent: mount " + f + "\n")
	}
	return console
}

// openFilesLimit is RLIMIT_NOFILE once the agent runs out of files. The kernel gives
// init 1024/4096 (Go raises its own soft limit to 4095), and each job a command leaves
// running holds two of the agent's fds, its output pipes, until it ends: about 2,000 such
// jobs made every exec fail with EMFILE.
const openFilesLimit = 1 << 20

var raisedOpenFiles atomic.Bool

// raiseOpenFilesLimit raises it, once, when a start ran out of files: whether it did now.
// Only then: what the agent starts inherits it from here on (Go hands children the
// kernel's 1024 back only while the agent's own limit is the one Go set), and programs
// that close every fd up to their soft limit before an exec take seconds per spawn at
// 1<<20 under emulation.
func raiseOpenFilesLimit() bool {
	if raisedOpenFiles.Swap(true) {
		return false
	}
	lim := syscall.Rlimit{Cur: openFilesLimit, Max: openFilesLimit}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		return true
	}
	// not allowed to raise the hard limit (no CAP_SYS_RESOURCE): as far as it goes
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) != nil || lim.Cur >= lim.Max {
		return false
	}
	lim.Cur = lim.Max
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim) == nil
}

// loopbackUp sets IFF_UP on lo with ioctls (no external tools in images).
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// powerOff ends the VM: TERM everyone, short grace, KILL, sync, unmount,
// reboot(2). PID 1 must never exit, so this never returns. Its lines go
// through s's console queue: a console guest root stopped must not hold it.
func powerOff(s *Server, mode string) {
	_ = syscall.Kill(-1, syscall.SIGTERM)
	grace := 500 * time.Millisecond
	deadline := time.Now().Add(grace)
	left := userProcessesLeft("/proc")
	for left && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		left = userProcessesLeft("/proc")
	}
	_ = syscall.Kill(-1, syscall.SIGKILL) // and any forked since the last look
	if left {
		s.logf("power-off: processes outlived SIGTERM by %v: SIGKILL", grace)
	} else {
		s.logf("power-off: every process ended on SIGTERM")
	}
	s.flushLog(200 * time.Millisecond)
	// Chosen before unmounting, which takes /sys away: without ACPI
	// (microvm, acpi=off) power-off only halts the CPU and QEMU keeps
	// running; a restart under QEMU's -no-reboot ends it instead.
	cmd := rebootCmd(mode, "/sys/firmware/acpi")
	syscall.Sync()
	unmountAll()
	syscall.Sync()
	for {
		err := unix.Reboot(cmd)
		s.logf("reboot: %v", err)
		time.Sleep(time.Second)
	}
}

// rebootCmd is the reboot(2) command that ends the VM as mode asks, given
// where the kernel shows ACPI (absent: power-off would only halt the CPU).
func rebootCmd(mode, acpi string) int {
	if _, err := os.Stat(acpi); err != nil || mode == "reboot" {
		return unix.LINUX_REBOOT_CMD_RESTART
	}
	return unix.LINUX_REBOOT_CMD_POWER_OFF
}

// unmountAll detaches every mount but / (newest first) and makes / read-only.
func unmountAll() {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return
	}
	var targets []string
	for _, line := range splitLines(string(b)) {
		var f []string
		for _, w := range splitFields(line) {
			f = append(f, w)
		}
		if len(f) >= 2 && f[1] != "/" {
			targets = append(targets, unescapeMount(f[1]))
		}
	}
	for i := len(targets) - 1; i >= 0; i-- {
		_ = unix.Unmount(targets[i], unix.MNT_DETACH)
	}
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
}
