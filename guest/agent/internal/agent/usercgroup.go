package agent

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// procGroup is the cgroup every process the agent starts is born into
// (clone3's CLONE_INTO_CGROUP), its pids.max below the kernel's threads-max.
// Without it a fork bomb (as root, whom RLIMIT_NPROC does not hold) took every
// task the kernel allows; the Go runtime then could not start an OS thread for
// the agent's next blocking call, and its fatal error, PID 1 exiting, panicked
// the kernel. Now the bomb's forks fail with EAGAIN at the group's limit, the
// agent keeps room for its own threads and keeps answering, and ending the
// command (its process group) ends the bomb.
var procGroup = &userCgroup{fd: -1, freeze: -1}

const (
	procGroupName = "isorun.procs"
	// tasks left outside the group: the agent's threads, the kernel's (kworkers
	// come and go) and what a process of the group forks while it is counted
	procGroupReserve = 256
	procGroupMinimum = 32
)

type userCgroup struct {
	mu   sync.Mutex
	root string // cgroup2 mount; "" (not PID 1): processes stay in the agent's group
	logf func(string, ...any)
	fd   int // the group's directory
	// its cgroup.freeze, written 0 before each start: a process born into a
	// frozen group is frozen before its exec, and the agent's vfork-style
	// fork waits for that exec holding forkMu (every start, kill and the
	// reaper then wait too); guest root freezing the group must not do that
	freeze int
	tried  bool
	// told: the console has heard that processes start without the group
	told bool
}

// enable is PID 1's, once cgroup2 is mounted at root; the group itself is made
// at first use, off the boot's path.
func (u *userCgroup) enable(root string, logf func(string, ...any)) {
	u.mu.Lock()
	u.root, u.logf = root, logf
	u.mu.Unlock()
}

// get returns the group's directory fd, -1 when processes start in the agent's
// own group (not PID 1, or the group could not be made: logged once per try).
func (u *userCgroup) get() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.root == "" || u.tried {
		return u.fd
	}
	u.tried = true
	fd, freeze, err := makeProcGroup(u.root, u.logf)
	if err != nil {
		u.logf("process cgroup: %v (processes start in the agent's own cgroup)", err)
		return -1
	}
	u.fd, u.freeze = fd, freeze
	return fd
}

// thaw unfreezes the group, under forkMu before a start into it (a freeze
// between the two is guest root's deliberate act against its own sandbox).
func (u *userCgroup) thaw() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.freeze >= 0 {
		_, _ = unix.Pwrite(u.freeze, []byte("0"), 0)
	}
}

// without says once on the console that a process starts in the agent's own
// group, without the limit: guest root made isorun.procs refuse it (a
// container runtime turning a controller on in the group it runs in does).
func (u *userCgroup) without(err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.told && u.logf != nil {
		u.told = true
		u.logf("process cgroup %s refuses new processes (%v): they start in the agent's "+
			"own group, without its pids limit", procGroupName, err)
	}
}

// lost forgets fd, which clone3 refused (guest root removed the group, or
// turned on a controller in it): the next get makes it again.
func (u *userCgroup) lost(fd int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.fd == fd && fd >= 0 {
		unix.Close(fd)
		unix.Close(u.freeze)
		u.fd, u.freeze, u.tried = -1, -1, false
	}
}

// groupRefused tells clone3's refusals of the group fd from an exec's own
// errors: a removed group (ENOENT, which an exec gives too: then the group is
// gone as well), one with controllers turned on for children (EBUSY), a
// threaded one (EOPNOTSUPP). No exec gives EBUSY or EOPNOTSUPP.
func groupRefused(err error, fd int) bool {
	if errors.Is(err, syscall.ENOENT) {
		var st unix.Stat_t
		return unix.Fstatat(fd, "cgroup.procs", &st, 0) != nil
	}
	return errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.EBUSY) ||
		errors.Is(err, syscall.EOPNOTSUPP)
}

func makeProcGroup(root string, logf func(string, ...any)) (dirFd, freezeFd int, err error) {
	if err := writeKnob(root+"/cgroup.subtree_control", "+pids"); err != nil {
		return -1, -1, fmt.Errorf("turn on the pids controller: %w", err)
	}
	// cpu too: the group's processes together then weigh as much as one of the
	// agent's threads, so however many there are, the agent gets its turns
	if err := writeKnob(root+"/cgroup.subtree_control", "+cpu"); err != nil {
		logf("process cgroup: turn on the cpu controller: %v", err)
	}
	dir := root + "/" + procGroupName
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, -1, err
	}
	raisePidMax()
	limit, err := procGroupLimit()
	if err != nil {
		return -1, -1, err
	}
	if err := writeKnob(dir+"/pids.max", strconv.Itoa(limit)); err != nil {
		return -1, -1, fmt.Errorf("set %s/pids.max to %d: %w", dir, limit, err)
	}
	freezeFd, err = unix.Open(dir+"/cgroup.freeze", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, -1, fmt.Errorf("open %s/cgroup.freeze: %w", dir, err)
	}
	dirFd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(freezeFd)
		return -1, -1, fmt.Errorf("open %s: %w", dir, err)
	}
	return dirFd, freezeFd, nil
}

// raisePidMax lifts pid_max to what the kernel allows: the guest kernel's
// small-footprint build starts it at 4096, which capped every sandbox, big
// or small, at that many tasks (and a bomb ran out of pids, not of the
// group's limit: the agent then could not make a thread). 32768 is the most
// that build takes; a fuller kernel (a user's own) takes more.
func raisePidMax() {
	_ = raiseKnob("/proc/sys/kernel/pid_max", 1<<22, 1<<15)
}

// procGroupLimit is what the kernel can give tasks (threads-max, and pid_max:
// each task holds a pid) less the tasks there are now and a reserve.
func procGroupLimit() (int, error) {
	threadsMax, err := readInt("/proc/sys/kernel/threads-max")
	if err != nil {
		return 0, err
	}
	ceiling := threadsMax
	if pidMax, err := readInt("/proc/sys/kernel/pid_max"); err == nil {
		ceiling = min(ceiling, pidMax)
	}
	tasks := 0
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		_, tasks, _ = loadavgTasks(strings.Fields(string(b)))
	}
	return max(procGroupMinimum, ceiling-tasks-procGroupReserve), nil
}

// forkExec starts a process in the group: made again once if clone3 refuses
// it, and failing that in the agent's own group. Under forkMu (the group's fds
// stay what they are until the fork).
func (u *userCgroup) forkExec(path string, argv []string, attr *syscall.ProcAttr) (int, error) {
	sys := attr.Sys
	for again := true; ; again = false {
		group := u.get()
		if group < 0 {
			break
		}
		sys.UseCgroupFD, sys.CgroupFD = true, group
		u.thaw()
		pid, err := syscall.ForkExec(path, argv, attr)
		if err == nil || !groupRefused(err, group) {
			return pid, err
		}
		sys.UseCgroupFD, sys.CgroupFD = false, 0
		if !again {
			u.without(err)
			break
		}
		u.lost(group)
	}
	return syscall.ForkExec(path, argv, attr)
}
