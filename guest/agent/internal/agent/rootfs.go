package agent

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	isorunDir  = "/.isorun"
	imageDir   = isorunDir + "/image"
	scratchDir = isorunDir + "/scratch"
	newRoot    = isorunDir + "/root"
	devWait    = 2 * time.Second
)

// trace prints boot timing when isorun.trace is on the kernel command line.
var trace = func(string, ...any) {}

func splitLines(s string) []string  { return strings.Split(strings.TrimSpace(s), "\n") }
func splitFields(s string) []string { return strings.Fields(s) }

// unescapeMount decodes the octal escapes of /proc/mounts (\040 etc.).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cmdlineParam returns key=value from the kernel command line.
func cmdlineParam(cmdline, key string) string {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}

// waitFor polls until path exists (devtmpfs creates nodes as devices probe).
func waitFor(path string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v", path, d)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// setupRoot follows the guest boot contract: image read-only, scratch (ext4
// or tmpfs when ""), overlayfs as the new root, move the kernel filesystems
// there and switch_root. On error everything is undone and the agent keeps
// serving from the initramfs.
func setupRoot(root, scratch string) (err error) {
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	mount := func(src, dst, fstype string, flags uintptr, data string) error {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		t0 := time.Now()
		defer func() { trace("mount %s %v", dst, time.Since(t0)) }()
		if err := unix.Mount(src, dst, fstype, flags, data); err != nil {
			return fmt.Errorf("mount %s on %s (%s): %w", src, dst, fstype, err)
		}
		undo = append(undo, func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
		return nil
	}
	if err := waitFor(root, devWait); err != nil {
		return err
	}
	trace("root disk")
	// A read-only image never allocates a block, so its block bitmaps are of
	// no use; without this ext4 starts a thread that reads them all in,
	// competing with the rest of the boot for the vCPU.
	if err := mount(root, imageDir, "ext4", unix.MS_RDONLY, "no_prefetch_block_bitmaps"); err != nil {
		return err
	}
	if scratch != "" {
		if err := waitFor(scratch, devWait); err != nil {
			return err
		}
		// no lazy-init thread competing with the boot for the vCPU: the template's
		// inode tables are zeroed already and block bitmaps load on first use
		if err := mount(scratch, scratchDir, "ext4", unix.MS_NOATIME, "noinit_itable,no_prefetch_block_bitmaps"); err != nil {
			return err
		}
	} else if err := mount("scratch", scratchDir, "tmpfs", 0, "mode=0755"); err != nil {
		return err
	}
	// The host's scratch template holds upper and work already (an older or
	// foreign disk may not). The merged root takes its owner and mode from
	// upper, so give it the image root's.
	upper, work := scratchDir+"/upper", scratchDir+"/work"
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	trace("upper and work")
	if err := matchOwnerAndMode(upper, imageDir); err != nil {
		return err
	}
	trace("owner")
	// redirect_dir: a directory of the image can be renamed (else rename(2)
	// fails EXDEV for it, and only tools that fall back to copying cope)
	opts := "lowerdir=" + imageDir + ",upperdir=" + upper + ",workdir=" + work + ",redirect_dir=on"
	if err := mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return err
	}
	// move the kernel filesystems (and the scratch disk) into the new root
	for _, d := range []string{"/dev", "/proc", "/sys", "/run", scratchDir} {
		dst := newRoot + d
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("mkdir %s in the image: %w", d, err)
		}
		if err := unix.Mount(d, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
		undo = append(undo, func() { _ = unix.Mount(dst, d, "", unix.MS_MOVE, "") })
	}
	if _, err := os.Lstat(newRoot + "/tmp"); os.IsNotExist(err) {
		if os.Mkdir(newRoot+"/tmp", 0o1777) == nil {
			_ = os.Chmod(newRoot+"/tmp", 0o1777)
		}
	}
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		_ = os.Chdir("/")
		return fmt.Errorf("switch_root: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		// cannot be undone cleanly any more; report and stay where we are
		undo = nil
		return fmt.Errorf("switch_root: chroot: %w", err)
	}
	_ = os.Chdir("/")
	return nil
}

// matchOwnerAndMode gives dst the owner and permission bits of src.
func matchOwnerAndMode(dst, src string) error {
	var want, have unix.Stat_t
	if err := unix.Stat(src, &want); err != nil {
		return err
	}
	if err := unix.Stat(dst, &have); err != nil {
		return err
	}
	if have.Uid != want.Uid || have.Gid != want.Gid {
		if err := unix.Chown(dst, int(want.Uid), int(want.Gid)); err != nil {
			return fmt.Errorf("chown %s: %w", dst, err)
		}
	}
	if have.Mode&0o7777 != want.Mode&0o7777 {
		if err := unix.Chmod(dst, want.Mode&0o7777); err != nil {
			return fmt.Errorf("chmod %s: %w", dst, err)
		}
	}
	return nil
}
