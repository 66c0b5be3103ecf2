package agent

import (
	"encoding/base64"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

type emptyReq struct {
	Op string `json:"op"`
}

func opHello(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op    string `json:"op"`
		Nonce string `json:"nonce"`
		// Key: a vsock host's proof (checked as the connection's first frame, conn.go).
		Key string `json:"key"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if len(r.Nonce) > 256 {
		return nil, errf("invalid", "nonce longer than 256 bytes")
	}
	ch.closeIn()
	m := ok("nonce", r.Nonce, "version", Version, "protocol", 1, "features", Features,
		"boot_ms", time.Since(s.Start).Milliseconds(), "boot_phases_ms", s.Boot.Snapshot())
	// The image root failing to mount is the boot's failure, not a later request's: said
	// with the answer that means "ready", the host need not ask health first.
	s.mu.Lock()
	if s.RootError != "" {
		m["root_error"] = s.RootError
	}
	if s.shuttingDown != "" {
		m["shutting_down"] = s.shuttingDown
	}
	s.mu.Unlock()
	return m, nil
}

// Features names what this agent does beyond protocol 1 as first written, so
// that a host can rely on it only with agents that have it (a VM re-adopted by
// a newer daemon runs the agent it booted with).
//   - watch_ready: a watch sends EVENT {"event":"watching"} once it is set up.
//   - fs_names: names and paths that are not UTF-8 travel as \udc80..\udcff
//     escapes both ways (fsname.go); an agent without it makes them U+FFFD.
//   - vsock_key: set_vsock_key on the serial port sets the key that a vsock
//     host must show in its first hello's key (vsockkey.go); an agent without
//     it admits any vsock peer on CID 2.
var Features = []string{"watch_ready", "fs_names", "vsock_key"}

func opHealth(s *Server, ch *Channel, raw []byte) (any, error) {
	if err := decode(raw, &emptyReq{}); err != nil {
		return nil, err
	}
	m := ok("version", Version, "uptime_ms", time.Since(s.Start).Milliseconds(),
		"procs", s.Procs.Live())
	s.mu.Lock()
	if s.RootError != "" {
		m["root_error"] = s.RootError
	}
	if s.shuttingDown != "" {
		m["shutting_down"] = s.shuttingDown
	}
	s.mu.Unlock()
	return m, nil
}

func opMetrics(s *Server, ch *Channel, raw []byte) (any, error) {
	if err := decode(raw, &emptyReq{}); err != nil {
		return nil, err
	}
	// Each figure or an error naming what could not be read (guest root may have
	// unmounted /proc, or mounted over it): never ok without them.
	m := ok()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return nil, errf("io", "metrics: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		key := map[string]string{"MemTotal": "mem_total_bytes", "MemAvailable": "mem_available_bytes"}[k]
		if fs := strings.Fields(v); key != "" && len(fs) > 0 {
			if n, err := strconv.ParseInt(fs[0], 10, 64); err == nil {
				m[key] = n * 1024
			}
		}
	}
	if b, err = os.ReadFile("/proc/loadavg"); err != nil {
		return nil, errf("io", "metrics: %v", err)
	}
	fs := strings.Fields(string(b))
	if running, _, ok := loadavgTasks(fs); ok {
		for i, k := range []string{"load1", "load5", "load15"} {
			if f, err := strconv.ParseFloat(fs[i], 64); err == nil {
				m[k] = f
			}
		}
		m["procs_running"] = running
	}
	if b, err = os.ReadFile("/proc/uptime"); err != nil {
		return nil, errf("io", "metrics: %v", err)
	}
	if fs := strings.Fields(string(b)); len(fs) > 0 {
		if f, err := strconv.ParseFloat(fs[0], 64); err == nil {
			m["uptime_s"] = f
		}
	}
	for _, k := range []string{"mem_total_bytes", "mem_available_bytes", "load1", "load5",
		"load15", "procs_running", "uptime_s"} {
		if _, found := m[k]; !found {
			return nil, errf("io", "metrics: /proc does not show %s (is it the kernel's procfs?)", k)
		}
	}
	return m, nil
}

const (
	clockFloorNs   = 946684800 * 1e9  // 2000-01-01T00:00:00Z
	clockCeilingNs = 7258118400 * 1e9 // 2200-01-01T00:00:00Z
)

// checkClock refuses a time outside 2000-2200: the host's clock outside these
// years is a bug or a hostile host, not a time to run programs at (and the
// kernel refuses some such values with a bare EINVAL).
func checkClock(unixNs *int64) *apiError {
	if unixNs == nil || *unixNs < clockFloorNs || *unixNs > clockCeilingNs {
		return errf("invalid", "unix_ns must be nanoseconds since 1970 between "+
			"2000-01-01 and 2200-01-01 (%d and %d)", int64(clockFloorNs), int64(clockCeilingNs))
	}
	return nil
}

func opSetClock(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op     string `json:"op"`
		UnixNs *int64 `json:"unix_ns"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if err := checkClock(r.UnixNs); err != nil {
		return nil, err
	}
	if !isPID1 {
		// the guest's clock only: an agent run as a program (its tests) is on the host
		return nil, errf("unsupported", "set_clock only works when the agent is PID 1")
	}
	ts := unix.NsecToTimespec(*r.UnixNs)
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return nil, errf("invalid", "unix_ns %d: the kernel refused it: %v", *r.UnixNs, err)
	}
	return ok(), nil
}

// RNDADDENTROPY takes struct rand_pool_info { int entropy_count (bits);
// int buf_size; __u32 buf[]; }.
func opReseed(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op      string `json:"op"`
		Entropy string `json:"entropy_b64"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	data, err := base64.StdEncoding.DecodeString(r.Entropy)
	if err != nil || len(data) < 16 || len(data) > 512 {
		return nil, errf("invalid", "entropy_b64 must be base64 of 16..512 bytes")
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, 8+len(data)+3)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(data) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(data))
	copy(buf[8:], data)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return nil, e
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return nil, e
	}
	return ok(), nil
}

func opShutdown(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op   string `json:"op"`
		Mode string `json:"mode"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if r.Mode == "" {
		r.Mode = "poweroff"
	}
	if r.Mode != "poweroff" && r.Mode != "reboot" {
		return nil, errf("invalid", "mode must be poweroff or reboot")
	}
	if s.Shutdown == nil {
		return nil, errf("unsupported", "shutdown only works when the agent is PID 1")
	}
	// Once: a second power-off alongside the first would race it to reboot(2).
	s.mu.Lock()
	running := s.shuttingDown
	if running == "" {
		s.shuttingDown = r.Mode
	}
	s.mu.Unlock()
	if running != "" {
		return nil, errf("busy", "a shutdown (%s) is already under way", running)
	}
	// RESP first and wait until it is written: the host must see it before
	// the VM goes away.
	sent := make(chan struct{})
	_ = ch.sendJSON(KindResp, ok(), true, sent)
	select {
	case <-sent:
	case <-time.After(time.Second):
	}
	s.Shutdown(r.Mode)
	return nil, nil
}

// opSetupRoot mounts the root filesystem on request: a guest restored from a
// template snapshot booted without one (its kernel command line named none).
// Once per guest, PID 1 only.
func opSetupRoot(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op      string `json:"op"`
		Root    string `json:"root"`
		Scratch string `json:"scratch"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	for _, dev := range []string{r.Root, r.Scratch} {
		if dev != "" && (!strings.HasPrefix(dev, "/dev/") || strings.Contains(dev, "..")) {
			return nil, errf("invalid", "%q is not a device under /dev", dev)
		}
	}
	if r.Root == "" {
		return nil, errf("invalid", "root is required")
	}
	if !isPID1 {
		return nil, errf("unsupported", "setup_root needs the agent to be PID 1")
	}
	s.mu.Lock()
	taken := s.rootTaken
	s.rootTaken = true
	s.mu.Unlock()
	if taken {
		return nil, errf("exists", "the root filesystem is set up already")
	}
	if err := setupRoot(r.Root, r.Scratch); err != nil {
		s.mu.Lock()
		s.RootError = err.Error()
		s.mu.Unlock()
		return nil, errf("io", "root filesystem: %v", err)
	}
	// The console's only line from a restored guest's start (its boot was the template's).
	s.logf("ready (restored from a template; root filesystem mounted on request)")
	return ok(), nil
}
