package agent

import (
	"os"
	"path/filepath"

	"github.com/fsnotify/fsnotify"
)

const maxWatchDirs = 8192

func opWatch(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	dirs := 0
	only := "" // a single file's watch: the one name reported (as path)
	add := func(p string) {
		if dirs < maxWatchDirs && w.Add(p) == nil {
			dirs++
		}
	}
	if r.Recursive && fi.IsDir() {
		// The walk of a big tree (under emulation, "/" takes seconds) stops at
		// the limit or a CANCEL, and skips the kernel's pseudo-filesystems
		// (/proc, /sys: inotify reports nothing there, and /proc alone holds
		// thousands of directories).
		_ = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
			select {
			case <-ch.cancel:
				return filepath.SkipAll
			case <-ch.Done():
				return filepath.SkipAll
			default:
			}
			if err != nil || !d.IsDir() {
				return nil
			}
			if p != path && onKernelFS(p) {
				return filepath.SkipDir
			}
			if dirs >= maxWatchDirs {
				return filepath.SkipAll
			}
			add(p)
			return nil
		})
	} else if fi.IsDir() {
		if err := w.Add(path); err != nil {
			return nil, err
		}
	} else {
		// A watch on the file itself follows its inode, which the first
		// replace (write_file, any editor's atomic save) takes away: so the
		// directory is watched for the file's name, which outlives replaces.
		// A symlink is followed once, now, to the file it names.
		real, err := filepath.EvalSymlinks(path)
		if err != nil {
			return nil, err
		}
		if err := w.Add(filepath.Dir(real)); err != nil {
			return nil, err
		}
		only = real
	}
	ops := []struct {
		op   fsnotify.Op
		name string
	}{{fsnotify.Create, "create"}, {fsnotify.Write, "write"}, {fsnotify.Remove, "remove"},
		{fsnotify.Rename, "rename"}, {fsnotify.Chmod, "chmod"}}
	for {
		select {
		case <-ch.cancel:
			return ok(), nil
		case <-ch.Done():
			return nil, nil
		case err := <-w.Errors:
			if err != nil {
				s.logf("watch %s: %v", path, err)
			}
		case ev, open := <-w.Events:
			if !open {
				return nil, errf("io", "watcher closed")
			}
			name := ev.Name
			if only != "" {
				if filepath.Clean(ev.Name) != only { // "//f" under /
					continue
				}
				name = path
			}
			if r.Recursive && ev.Has(fsnotify.Create) {
				if fi, err := os.Lstat(ev.Name); err == nil && fi.IsDir() {
					add(ev.Name)
				}
			}
			for _, o := range ops {
				if ev.Has(o.op) {
					if ch.Event(map[string]any{"event": "fs", "op": o.name, "path": name}) != nil {
						return nil, nil
					}
				}
			}
		}
	}
}
