package agent

import (
	"bufio"
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
	s.mu.Unlock()
	return m, nil
}

func opMetrics(s *Server, ch *Channel, raw []byte) (any, error) {
	if err := decode(raw, &emptyReq{}); err != nil {
		return nil, err
	}
	m := ok()
	if f, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), ":")
			fs := strings.Fields(v)
			if len(fs) == 0 {
				continue
			}
			n, _ := strconv.ParseInt(fs[0], 10, 64)
			switch k {
			case "MemTotal":
				m["mem_total_bytes"] = n * 1024
			case "MemAvailable":
				m["mem_available_bytes"] = n * 1024
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		fs := strings.Fields(string(b))
		if len(fs) >= 4 {
			for i, k := range []string{"load1", "load5", "load15"} {
				m[k], _ = strconv.ParseFloat(fs[i], 64)
			}
			run, _, _ := strings.Cut(fs[3], "/")
			m["procs_running"], _ = strconv.Atoi(run)
		}
	}
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		if fs := strings.Fields(string(b)); len(fs) > 0 {
			m["uptime_s"], _ = strconv.ParseFloat(fs[0], 64)
		}
	}
	return m, nil
}

func opSetClock(s *Server, ch *Channel, raw []byte) (any, error) {
	var r struct {
		Op     string `json:"op"`
		UnixNs *int64 `json:"unix_ns"`
	}
	if err := decode(raw, &r); err != nil {
		return nil, err
	}
	if r.UnixNs == nil || *r.UnixNs <= 0 {
		return nil, errf("invalid", "unix_ns must be a positive integer")
	}
	ts := unix.NsecToTimespec(*r.UnixNs)
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return nil, err
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
