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
	add := func(p string) {
		if dirs < maxWatchDirs && w.Add(p) == nil {
			dirs++
		}
	}
	if r.Recursive && fi.IsDir() {
		_ = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				add(p)
			}
			return nil
		})
	} else if err := w.Add(path); err != nil {
		return nil, err
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
			if r.Recursive && ev.Has(fsnotify.Create) {
				if fi, err := os.Lstat(ev.Name); err == nil && fi.IsDir() {
					add(ev.Name)
				}
			}
			for _, o := range ops {
				if ev.Has(o.op) {
					if ch.Event(map[string]any{"event": "fs", "op": o.name, "path": ev.Name}) != nil {
						return nil, nil
					}
				}
			}
		}
	}
}
