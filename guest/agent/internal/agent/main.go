package agent

import (
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
	console := initSystem()
	cmdline, _ := os.ReadFile("/proc/cmdline")
	if cmdlineParam(string(cmdline), "isorun.trace") != "" {
		trace = func(f string, a ...any) {
			fmt.Fprintf(console, "isorun-agent: +%v "+f+"\n", append([]any{time.Since(start)}, a...)...)
		}
	}
	t := func(what string) { trace("%s", what) }
	t("init")
	s := NewServer(start)
	s.Log = console
	s.Shutdown = powerOff
	s.Procs.StartReaper()
	// Find and open the port while the root is being mounted: both wait on the
	// kernel (device probing, ext4 mounts), so overlapping them shortens boot. An
	// fd opened before switch_root stays valid after /dev is moved.
	portCh := make(chan *os.File, 1)
	go func() {
		var port *os.File
		for warned := false; port == nil; {
			dev, err := findPort(PortName, 5*time.Second)
			if err == nil {
				port, err = os.OpenFile(dev, os.O_RDWR, 0)
			}
			if err != nil && !warned {
				s.logf("%v; still waiting", err)
				warned = true
			}
		}
		portCh <- port
	}()
	if err := setupRoot(string(cmdline)); err != nil {
		s.RootError = err.Error()
		s.logf("root filesystem: %v (serving from the initramfs)", err)
	}
	t("root")
	go func() {
		if err := loopbackUp(); err != nil {
			s.logf("lo: %v", err)
		}
	}()
	port := <-portCh
	t("port")
	s.logf("ready")
	s.ServePort(port)
	s.logf("port loop ended; powering off")
	powerOff("poweroff")
}
