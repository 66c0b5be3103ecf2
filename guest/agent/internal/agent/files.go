package agent

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"syscall"
)

// read_file, and what the file ops share: the request, modes, errors that
// name the path asked for, and opening a file as the kernel would.

type fileReq struct {
	Op        string `json:"op"`
	Path      fsName `json:"path"`
	Offset    int64  `json:"offset"`
	Length    *int64 `json:"length"`
	Mode      *int64 `json:"mode"`
	Append    bool   `json:"append"`
	Mkdirs    *bool  `json:"mkdirs"`
	Depth     *int   `json:"depth"`
	Parents   *bool  `json:"parents"`
	Recursive bool   `json:"recursive"`
	// whose what write_file and mkdir create is (default: the sandbox's user)
	User json.RawMessage `json:"user"`
}

func fileMode(m *int64, def os.FileMode) (os.FileMode, error) {
	if m == nil {
		return def, nil
	}
	if *m < 0 || *m > 0o7777 {
		return 0, errf("invalid", "mode must be 0..0o7777")
	}
	fm := os.FileMode(*m & 0o777)
	if *m&0o4000 != 0 {
		fm |= os.ModeSetuid
	}
	if *m&0o2000 != 0 {
		fm |= os.ModeSetgid
	}
	if *m&0o1000 != 0 {
		fm |= os.ModeSticky
	}
	return fm, nil
}

func opReadFile(s *Server, ch *Channel, raw []byte) (any, error) {
	r, path, err := s.decodePathReq(raw)
	if err != nil {
		return nil, err
	}
	length := int64(-1)
	if r.Length != nil {
		length = *r.Length
	}
	if r.Offset < 0 || length < -1 {
		return nil, errf("invalid", "offset must be >= 0 and length >= -1")
	}
	f, st, err := openFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return nil, errf("is_dir", "%s is a directory", path)
	}
	if err := ch.Event(map[string]any{"event": "file", "size": st.Size, "mode": st.Mode & 0o7777}); err != nil {
		return nil, nil
	}
	ch.closeIn()
	// A device gives records (/dev/kmsg: one a read, EINVAL for a buffer left
	// too small), so it gets one read a frame where a file's ReadAt fills it.
	device := st.Mode&syscall.S_IFMT == syscall.S_IFCHR
	if device && r.Offset > 0 {
		if _, err := f.Seek(r.Offset, io.SeekStart); err != nil {
			return nil, errf("invalid", "%s is a device that cannot be read from offset %d: %v",
				path, r.Offset, errnoText(err))
		}
	}
	var sent int64
	off := r.Offset
	for length < 0 || sent < length {
		want := MaxOutPayload
		if length >= 0 {
			want = int(min(int64(want), length-sent))
		}
		var k int
		if device {
			k, err = ch.acquireAll(want, ch.cancel) // a record cut by the window would lose its rest
		} else {
			k, err = ch.acquire(want, ch.cancel)
		}
		if err == errAborted {
			return nil, errf("io", "cancelled")
		} else if err != nil {
			return nil, nil
		}
		pb, buf := newDataFrame(k)
		var n int
		var rerr error
		if device {
			n, rerr = readDevice(f, pb, k)
		} else {
			n, rerr = f.ReadAt(buf[headerSize:headerSize+k], off)
		}
		if errors.Is(rerr, syscall.EAGAIN) {
			rerr = io.EOF // opened non-blocking (a FIFO must not hang the open): all there is
		}
		ch.addCredit(int64(k - n))
		if n > 0 {
			if ch.sendData(KindOut, pb, buf[:headerSize+n]) != nil {
				return nil, nil
			}
			off += int64(n)
			sent += int64(n)
		} else {
			framePool.Put(pb)
		}
		if rerr == io.EOF {
			break
		} else if rerr != nil {
			return nil, pathErr("read", path, rerr)
		}
	}
	return ok("bytes", sent), nil
}

// pathErr names path, the one the host asked for, in an error about the file
// it resolved to, keeping the errno (and so the error code).
func pathErr(op, path string, err error) error {
	if _, ok := err.(*apiError); ok {
		return err
	}
	var pe *os.PathError
	var le *os.LinkError
	if errors.As(err, &pe) {
		err = pe.Err
	} else if errors.As(err, &le) {
		err = le.Err
	}
	return &os.PathError{Op: op, Path: path, Err: err}
}

// openFile opens path for read_file and returns its stat. Opening a FIFO
// blocks until its other end opens, which a guest process can withhold
// forever (and CANCEL cannot interrupt open(2)); so it opens without blocking
// and refuses FIFOs and sockets, which read_file cannot serve (pread on a
// pipe fails). Never as a controlling terminal: the agent (PID 1) is a
// session leader without one, and reading a free terminal would make it every
// later command's /dev/tty. (write_file's in-place writes open with
// openInPlace.)
func openFile(path string) (*os.File, *syscall.Stat_t, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	st := fi.Sys().(*syscall.Stat_t)
	kind := ""
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFIFO:
		kind = "FIFO"
	case syscall.S_IFSOCK:
		kind = "socket"
	}
	if kind != "" {
		f.Close()
		return nil, nil, errf("invalid", "%s is a %s, not a regular file", path, kind)
	}
	return f, st, nil
}

// decodePathReq decodes a file request and checks its "path" field.
func (s *Server) decodePathReq(raw []byte) (fileReq, string, error) {
	var r fileReq
	if err := decode(raw, &r); err != nil {
		return r, "", err
	}
	path, err := s.reqPath("path", string(r.Path))
	return r, path, err
}

// readDevice reads at most k bytes of a device into the frame pb, in one
// read(2). A device of records refuses a buffer shorter than its next record
// (EINVAL, the record kept): it is read again into a whole frame, of which k
// bytes are kept. A stream device is never read past k.
func readDevice(f *os.File, pb *[]byte, k int) (int, error) {
	n, err := readRecord(f, (*pb)[headerSize:headerSize+k])
	if errors.Is(err, syscall.EINVAL) && k < MaxOutPayload {
		n, err = readRecord(f, (*pb)[headerSize:headerSize+MaxOutPayload])
		n = min(n, k)
	}
	return n, err
}

// readRecord is one read(2), its EAGAIN returned: os.File.Read of a pollable
// fd (a device opened non-blocking) would wait in the poller for more data,
// and a device of records that has no more never sends any.
func readRecord(f *os.File, b []byte) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), b)
		return true
	}); err != nil {
		return 0, err
	}
	if n < 0 {
		n = 0
	}
	if n == 0 && rerr == nil && len(b) > 0 {
		rerr = io.EOF
	}
	return n, rerr
}
