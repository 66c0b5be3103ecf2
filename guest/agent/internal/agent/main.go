package agent

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"
)

// Main is the agent entry point. As PID 1 it sets the guest up and serves
// the virtio-serial port; otherwise it serves stdin/stdout (or -port).
func Main() {
	start := time.Now()
	if isPID1 {
		reserveStdFds()
		runPID1(start)
		return
	}
	port := flag.String("port", "", "serve this device instead of stdin/stdout")
	flag.Parse()
	s := NewServer(start)
	s.Log = os.Stderr
	s.Procs.StartReaper()
	if *port != "" {
		f, err := os.OpenFile(*port, os.O_RDWR, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "isorun-agent:", err)
			os.Exit(1)
		}
		s.ServePort(f)
	}
	err := s.ServeConn(stdio{os.Stdin, os.Stdout})
	if err != nil && err != io.EOF {
		fmt.Fprintln(os.Stderr, "isorun-agent:", err)
		os.Exit(1)
	}
}

type stdio struct{ r, w *os.File }

func (s stdio) Read(p []byte) (int, error)  { return s.r.Read(p) }
func (s stdio) Write(p []byte) (int, error) { return s.w.Write(p) }

func runPID1(start time.Time) {
	boot := newBootClock(start)
	console := initSystem()
	cmdline, _ := os.ReadFile("/proc/cmdline")
	if cmdlineParam(string(cmdline), "isorun.trace") != "" {
		trace = func(f string, a ...any) {
			fmt.Fprintf(console, "isorun-agent: +%v "+f+"\n", append([]any{time.Since(start)}, a...)...)
		}
	}
	boot.Mark("init")
	s := NewServer(start)
	s.Log = console
	s.Shutdown = func(mode string) { powerOff(s, mode) }
	s.Boot = boot
	s.Procs.StartReaper()
	ignoreStraySignals(s.logf)
	ready := s.HoldRequests()
	// Serve the port as soon as it exists, while the root is being mounted: the
	// host's hello is read (QEMU hands it over only once the port is open, which
	// takes a few round trips) in the meantime and answered the moment the root
	// is ready. An fd opened before switch_root stays valid after /dev is moved.
	go func() {
		port := openPort(s)
		boot.Mark("port")
		primeRequestPath(s)
		trace("primed")
		s.ServePort(port)
	}()
	// vsock, where the host has it, is served beside the serial port (which
	// QEMU always provides): the host picks one, and falls back to serial.
	if port, err := parseVsockPort(string(cmdline)); err != nil {
		s.logf("%v", err)
	} else if port != 0 {
		go func() {
			if err := s.ServeVsock(port); err != nil {
				s.logf("vsock port %d: %v", port, err)
			}
		}()
	}
	if root := cmdlineParam(string(cmdline), "isorun.root"); root != "" {
		s.rootTaken = true
		if err := setupRoot(root, cmdlineParam(string(cmdline), "isorun.scratch")); err != nil {
			s.RootError = err.Error()
			s.logf("root filesystem: %v (serving from the initramfs)", err)
		}
	}
	boot.Mark("root")
	procGroup.enable("/sys/fs/cgroup", s.logf)
	// Made before the first command needs it, most often, but after the hello's
	// answer has gone out (under TCG making it is first-run code: ~10 ms).
	time.AfterFunc(100*time.Millisecond, func() { procGroup.get() })
	go func() {
		if err := loopbackUp(); err != nil {
			s.logf("lo: %v", err)
		}
		if err := raiseInotifyInstances(); err != nil {
			s.logf("inotify: %v", err)
		}
	}()
	ready()
	s.logf("ready")
	select {} // PID 1 never returns; ServePort serves until power-off
}

// openPort waits (forever: without it the guest is unreachable) for the
// agent's virtio-serial port and opens it.
func openPort(s *Server) *os.File {
	for warned := false; ; {
		dev, err := findPort(PortName, 5*time.Second)
		if err == nil {
			var port *os.File
			if port, err = os.OpenFile(dev, os.O_RDWR, 0); err == nil {
				return port
			}
		}
		if !warned {
			s.logf("%v; still waiting", err)
			warned = true
		}
	}
}

// primeRequestPath runs a hello's decoding and encoding once, off the wire.
// Under TCG the first run of any code is translated first, and encoding/json
// builds its type caches on first use: together 30-90 ms here, paid before
// the first answer either way. Done while the root is still mounting, it
// fills the vCPU's waits for disk reads instead of following "root ready".
func primeRequestPath(s *Server) {
	raw := []byte(`{"op":"hello","nonce":"00"}`)
	var head struct {
		Op string `json:"op"`
	}
	_ = json.Unmarshal(raw, &head)
	var req struct {
		Op    string `json:"op"`
		Nonce string `json:"nonce"`
	}
	_ = decode(raw, &req)
	resp, err := json.Marshal(ok("nonce", req.Nonce, "version", Version, "protocol", 1,
		"features", Features, "boot_ms", int64(0), "boot_phases_ms", s.Boot.Snapshot()))
	if err == nil {
		_ = EncodeFrame(0, KindResp, resp)
	}
}
