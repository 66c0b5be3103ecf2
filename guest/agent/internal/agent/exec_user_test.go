package agent

import (
	"os"
	"strings"
	"testing"
	"time"
)

// A cwd the exec's user cannot enter is named as the cause, not the program
// ("true: permission denied", exit 126: the child's chdir runs as the user).
func TestExecInACwdItsUserCannotEnterNamesTheCwd(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir() // 0700, root's
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"true"}, "user": "nobody", "cwd": dir})
	want := "cwd " + dir + ": permission denied for uid 65534"
	if !strings.Contains(string(r.err), want) || num(r.resp["exit_code"]) != 127 {
		t.Fatalf("err=%q resp=%v", r.err, r.resp)
	}
}

// A terminal is its user's, as grantpt makes it: the user can reopen it.
func TestAPTYIsOwnedByItsUser(t *testing.T) {
	c := newClient(t, nil)
	r := c.call(1, map[string]any{"op": "exec", "cmd": "stat -c %u $(tty) && echo hi >> $(tty)",
		"user": "nobody", "cwd": "/", "pty": map[string]any{}})
	if !strings.Contains(string(r.out), "65534\r\nhi\r\n") || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q resp=%v", r.out, r.resp)
	}
}

// A relative PATH entry is looked up in the command's cwd, as execvp there
// would (it was looked up in the agent's own).
func TestARelativePathEntryIsFoundInTheCwd(t *testing.T) {
	c := newClient(t, nil)
	dir := t.TempDir()
	if err := os.Mkdir(dir+"/bin", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/bin/hello", []byte("#!/bin/sh\necho found\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := c.call(1, map[string]any{"op": "exec", "argv": []string{"hello"}, "cwd": dir,
		"env": map[string]string{"PATH": "bin:/usr/bin:/bin"}})
	if string(r.out) != "found\n" {
		t.Fatalf("out=%q err=%q resp=%v", r.out, r.err, r.resp)
	}
}

// Another user than the sandbox's own gets their own HOME, and, when the
// default cwd is closed to them (the image's WORKDIR /root), starts in their
// home or / instead of failing every command.
func TestAnotherUserGetsTheirHomeAndAUsableCwd(t *testing.T) {
	c := newClient(t, nil)
	closed := t.TempDir() // 0700, root's
	c.call(1, map[string]any{"op": "set_defaults", "cwd": closed,
		"env": map[string]string{"HOME": "/root", "A": "1"}})
	r := c.call(2, map[string]any{"op": "exec", "cmd": "echo $HOME $A; pwd", "user": "nobody"})
	home := lookupHome(t, "nobody")
	want := "/"
	if fi, err := os.Stat(home); err == nil && fi.IsDir() {
		want = home
	}
	if string(r.out) != home+" 1\n"+want+"\n" || num(r.resp["exit_code"]) != 0 {
		t.Fatalf("out=%q err=%q resp=%v", r.out, r.err, r.resp)
	}
	// root keeps the defaults: the cwd asked for, the env's HOME
	r = c.call(3, map[string]any{"op": "exec", "cmd": "echo $HOME; pwd"})
	if string(r.out) != "/root\n"+closed+"\n" {
		t.Fatalf("out=%q", r.out)
	}
	// a cwd asked for explicitly is not replaced: its error names it
	r = c.call(4, map[string]any{"op": "exec", "cmd": "pwd", "user": "nobody", "cwd": closed})
	if !strings.Contains(string(r.err), "cwd "+closed+": permission denied") {
		t.Fatalf("err=%q", r.err)
	}
}

func lookupHome(t *testing.T, user string) string {
	t.Helper()
	a, err := lookupAccount(user)
	if err != nil {
		t.Fatal(err)
	}
	return a.home
}

// The sandbox's own account named another way ("root", "0") is not another
// user: the defaults' HOME stays.
func TestTheSandboxsOwnUserNamedAnotherWayKeepsTheDefaultsHome(t *testing.T) {
	c := newClient(t, nil)
	c.call(1, map[string]any{"op": "set_defaults", "env": map[string]string{"HOME": "/custom"}})
	for i, user := range []any{nil, "root", "0"} {
		req := map[string]any{"op": "exec", "cmd": "echo $HOME", "cwd": "/"}
		if user != nil {
			req["user"] = user
		}
		if r := c.call(uint32(2+i), req); string(r.out) != "/custom\n" {
			t.Fatalf("user %v: %q", user, r.out)
		}
	}
}

// What could not start is said in one line of stderr, cut to maxFailMsg: it
// quotes what the request gave. One longer than the ring hung a foreground
// exec (its reader starts after the line is written) and left a background
// process's ring holding the wrong bytes.
func TestAStartFailureQuotingALongRequestIsCut(t *testing.T) {
	user := strings.Repeat("\x7f", 40000) // quoted, each byte takes four
	for i, background := range []bool{false, true} {
		c := newClient(t, nil)
		req := map[string]any{"op": "exec", "argv": []string{"true"}, "user": user,
			"ring_bytes": 65536, "background": background}
		c.req(1, req)
		done := make(chan *result, 1)
		go func() { done <- c.wait(1, 30*time.Second) }()
		var r *result
		select {
		case r = <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("background=%v: no answer within 5 s", background)
		}
		if background {
			r = c.call(2, map[string]any{"op": "attach", "proc_id": r.resp["proc_id"]})
		}
		line := string(r.err)
		if num(r.resp["exit_code"]) != 127 || !strings.HasPrefix(line, "isorun-agent: user ") ||
			!strings.HasSuffix(line, "...\n") || strings.Count(line, "\n") != 1 ||
			len(line) > maxFailMsg+len("isorun-agent: ...\n") {
			t.Fatalf("case %d: resp %v, stderr of %d bytes: %.80q", i, r.resp, len(line), line)
		}
	}
}
