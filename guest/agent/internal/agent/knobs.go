package agent

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Kernel knobs (/proc/sys, cgroupfs) and counters read and written as numbers.

func readInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("%s: %q: %w", path, b, err)
	}
	return n, nil
}

// raiseKnob lifts the number at path to the first of values the kernel takes,
// and never lowers it.
func raiseKnob(path string, values ...int) error {
	now, _ := readInt(path)
	var err error
	for _, v := range values {
		if v <= now {
			return nil
		}
		if err = writeKnob(path, strconv.Itoa(v)); err == nil {
			return nil
		}
	}
	return err
}

// loadavgTasks is /proc/loadavg's fourth field: the tasks running and all the
// tasks there are (kernel threads included, as threads-max counts them).
func loadavgTasks(loadavg []string) (running, total int, ok bool) {
	if len(loadavg) < 4 {
		return 0, 0, false
	}
	r, t, found := strings.Cut(loadavg[3], "/")
	running, err1 := strconv.Atoi(r)
	total, err2 := strconv.Atoi(t)
	return running, total, found && err1 == nil && err2 == nil
}

func writeKnob(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
