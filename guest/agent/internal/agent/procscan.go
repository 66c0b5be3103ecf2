package agent

import (
	"os"
	"strconv"
	"strings"
)

// eachLiveUserProcess calls fn with the pid and the stat fields after the
// command name (state, ppid, pgrp, session, ...) of each live user process in
// proc (a procfs): not a kernel thread, not a zombie (the reaper collects
// those), not PID 1.
func eachLiveUserProcess(proc string, fn func(pid int, fields []string)) {
	entries, err := os.ReadDir(proc)
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		stat, err := os.ReadFile(proc + "/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		if f := liveUserStat(string(stat)); f != nil {
			fn(pid, f)
		}
	}
}

// userProcessesLeft reports whether a process other than PID 1 is still
// alive. kill(-1, 0) cannot tell, since it reaches kernel threads too and so
// always succeeds: power-off then sat out its whole grace period every time.
func userProcessesLeft(proc string) bool {
	left := false
	eachLiveUserProcess(proc, func(int, []string) { left = true })
	return left
}

// sessionGroups lists the process groups of session sid's live processes:
// the jobs of a terminal's shell, each of which it runs in a group of its own.
func sessionGroups(proc string, sid int) []int {
	want := strconv.Itoa(sid)
	seen := map[int]bool{}
	var groups []int
	eachLiveUserProcess(proc, func(_ int, f []string) {
		if pgrp, err := strconv.Atoi(f[2]); err == nil && f[3] == want && !seen[pgrp] {
			seen[pgrp] = true
			groups = append(groups, pgrp)
		}
	})
	return groups
}

// pfKthread is PF_KTHREAD in the flags field of /proc/<pid>/stat.
const pfKthread = 0x00200000

// liveUserStat reads a /proc/<pid>/stat line: its fields after the command
// name (state, ppid, pgrp, session, ...), or nil for a kernel thread, a
// zombie or a malformed line. Fields are counted after the ")" that ends the
// command name, which may itself hold spaces and parentheses.
func liveUserStat(stat string) []string {
	end := strings.LastIndexByte(stat, ')')
	if end < 0 {
		return nil
	}
	f := strings.Fields(stat[end+1:])
	if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
		return nil
	}
	flags, err := strconv.ParseUint(f[6], 10, 64)
	if err != nil || flags&pfKthread != 0 {
		return nil
	}
	return f
}

// isLiveUserProcess reads a /proc/<pid>/stat line: not a kernel thread and
// not a zombie.
func isLiveUserProcess(stat string) bool { return liveUserStat(stat) != nil }
