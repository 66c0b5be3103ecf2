package agent

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"
)

func FuzzFsNameRoundTrips(f *testing.F) {
	for _, seed := range []string{"", "plain", "caf\xe9", "\xff\xfe", "é and \xe9", "\xed\xa0\x80",
		"emoji 😀 \x80", "quote \" back\\slash \n <&>", "\xc3", "a\xc3(b"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := json.Marshal(fsName(s))
		if err != nil {
			t.Fatal(err)
		}
		var back fsName
		if err := json.Unmarshal(b, &back); err != nil || string(back) != s {
			t.Fatalf("%q -> %s -> %q (%v)", s, b, back, err)
		}
		var text string // still a JSON string any decoder reads
		if err := json.Unmarshal(b, &text); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
	})
}

func TestFsNameEncodesAsPythonsSurrogateEscape(t *testing.T) {
	for in, want := range map[string]string{
		"caf\xe9":      `"caf\udce9"`,
		"café":         `"café"`,
		"\xff<":        `"\udcff\u003c"`,
		"\xed\xa0\x80": `"\udced\udca0\udc80"`, // an encoded surrogate is no UTF-8 either
	} {
		if b, _ := json.Marshal(fsName(in)); string(b) != want {
			t.Errorf("%q: %s, want %s", in, b, want)
		}
	}
	var n fsName
	if err := json.Unmarshal([]byte(`"\ud83d\ude00 \udce9 \\udce9"`), &n); err != nil || n != "😀 \xe9 \\udce9" {
		t.Errorf("got %q (%v)", n, err)
	}
	for _, bad := range []string{`"\ud800"`, `"\udc00"`, `"\udfff"`, `"\ud800x"`, `"\ud800\u0041"`} {
		if err := json.Unmarshal([]byte(bad), &n); err == nil {
			t.Errorf("%s: decoded as %q, want an error", bad, n)
		}
	}
}

// A file whose name is not UTF-8 is listed under a name that names it again:
// stat, rename and remove find it, and a watch reports it the same way.
func TestANameThatIsNotUTF8IsListedAsOneThatNamesIt(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/caf\xe9", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nil)
	c.watch(1, map[string]any{"path": dir})
	c.req(2, map[string]any{"op": "list", "path": dir})
	if listing := rawUntilResp(c, 2); !strings.Contains(listing, `"name":"caf\udce9"`) {
		t.Fatalf("listing %s", listing)
	}
	// the host sends the name back as it got it: a JSON text with the escape
	escaped := json.RawMessage(`"` + dir + `/caf\udce9"`)
	if r := c.call(3, map[string]any{"op": "stat", "path": escaped}); r.resp["ok"] != true {
		t.Fatalf("stat: %v", r.resp)
	}
	moved := json.RawMessage(`"` + dir + `/\udcff"`)
	if r := c.call(4, map[string]any{"op": "rename", "src": escaped, "dst": moved}); r.resp["ok"] != true {
		t.Fatalf("rename: %v", r.resp)
	}
	if _, err := os.Stat(dir + "/\xff"); err != nil {
		t.Fatalf("renamed: %v", err)
	}
	var events string
	for !strings.Contains(events, `/\udcff"`) {
		events += string(c.next(1, 5*time.Second).Payload)
	}
	if r := c.call(5, map[string]any{"op": "remove", "path": moved}); r.resp["ok"] != true {
		t.Fatalf("remove: %v", r.resp)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left %v", left)
	}
	bad := json.RawMessage(`"` + dir + `/\ud800"`)
	if r := c.call(6, map[string]any{"op": "stat", "path": bad}); r.resp["code"] != "invalid" {
		t.Fatalf("a lone surrogate that stands for no byte: %v", r.resp)
	}
}

// rawUntilResp is what channel ch sent up to and with its RESP, as sent (a
// decoded map would hold U+FFFD for each escape).
func rawUntilResp(c *client, ch uint32) string {
	var all []byte
	for {
		f := c.next(ch, 10*time.Second)
		all = append(all, f.Payload...)
		if f.Kind == KindResp {
			return string(all)
		}
	}
}
