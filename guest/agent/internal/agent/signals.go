package agent

import (
	"os"
	"os/signal"
	"syscall"
)

// straySignals are the signals a guest process (root) may send PID 1 that
// the Go runtime would otherwise answer by exiting or crashing: SIGHUP
// (`telinit q`, `kill -HUP 1`), SIGTERM, SIGINT, SIGPWR, SIGQUIT, ... The
// kernel delivers them to init because the runtime has handlers installed,
// and PID 1 exiting panics the guest kernel. SIGCHLD (the reaper), SIGURG and
// SIGPROF (the runtime's own) are not in the list, nor is SIGPIPE: the runtime
// ignores one it is not asked to deliver, and delivering it made each of the
// agent's own EPIPEs (stdin for a program that stopped reading) a console line.
var straySignals = []os.Signal{
	syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGILL, syscall.SIGTRAP,
	syscall.SIGABRT, syscall.SIGBUS, syscall.SIGFPE, syscall.SIGUSR1, syscall.SIGSEGV,
	syscall.SIGUSR2, syscall.SIGALRM, syscall.SIGTERM, syscall.SIGSTKFLT,
	syscall.SIGVTALRM, syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGIO, syscall.SIGPWR,
	syscall.SIGSYS,
}

// ignoreStraySignals logs and otherwise ignores straySignals. It uses a
// handler, not SIG_IGN, because ignored dispositions survive execve and every
// process the agent starts would inherit them. Returns a stop function.
func ignoreStraySignals(logf func(string, ...any)) (stop func()) {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, straySignals...)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case sig := <-ch:
				logf("ignored signal %v (the agent is PID 1; the host ends the VM)", sig)
			case <-done:
				return
			}
		}
	}()
	return func() { signal.Stop(ch); close(done) }
}
