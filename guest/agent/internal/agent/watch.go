package agent

import (
	"os"
	"path/filepath"
	"strings"
)

// maxWatchDirs bounds the directories one recursive watch holds (a var for tests).
var maxWatchDirs = 8192

func opWatch(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	root, only := path, "" // only: a single file's watch, the one name reported (as path)
	if !fi.IsDir() {
		// A watch on the file itself follows its inode, which the first
		// replace (write_file, any editor's atomic save) takes away: so the
		// directory is watched for the file's name, which outlives replaces.
		// A symlink is followed once, now, to the file it names.
		dir, err := resolveDir(filepath.Dir(path))
		if err != nil {
			return nil, err
		}
		real := filepath.Join(dir, filepath.Base(path))
		if fi, err := os.Lstat(real); err == nil && fi.Mode()&os.ModeSymlink != 0 {
			if real, err = filepath.EvalSymlinks(real); err != nil {
				return nil, err
			}
		}
		root, only = filepath.Dir(real), real
	}
	recursive := r.Recursive && only == ""
	if fi, err := os.Lstat(root); recursive && err == nil && fi.Mode()&os.ModeSymlink != 0 && !strings.HasSuffix(root, "/") {
		root += "/" // a link to a directory: walked as that directory, named as the link
	}
	w, err := newTreeWatch(root, recursive, ch.ended)
	if err != nil {
		return nil, err
	}
	defer w.Close()
	emit := func(c fsChange) bool {
		p := c.path
		if isTempName(filepath.Base(p)) {
			return true // write_file's own file, renamed over its target when complete
		}
		if only != "" {
			// a neighbour is skipped; the directory's own end is the file's, and
			// an overflow (of the directory's queue) may have hidden the file's
			if p != only && !c.end && c.op != "overflow" {
				return true
			}
			p = path
		}
		return ch.Event(map[string]any{"event": "fs", "op": c.op, "path": fsName(p)}) == nil
	}
	// The walk of a big tree (under emulation, "/" takes seconds) stops at the
	// directory limit or a CANCEL.
	if recursive && !w.addTree(root, false, emit) {
		return nil, nil
	}
	// Set up: a change from now on is reported (a host may wait for this
	// before telling its caller that the watch is on).
	if ch.Event(map[string]any{"event": "watching"}) != nil {
		return nil, nil
	}
	done := make(chan struct{})
	defer close(done)
	reads := w.reads(done)
	for {
		select {
		case <-ch.cancel:
			return ok(), nil
		case <-ch.Done():
			return nil, nil
		case buf, open := <-reads:
			if !open {
				return nil, errf("io", "watch %s: reading its events failed", path)
			}
			if !w.handle(buf, emit) {
				if ch.ended() {
					return nil, nil
				}
				return ok("ended", "the watched path is gone"), nil
			}
		}
	}
}
