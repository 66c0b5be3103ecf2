package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// fsName is a file name or path as the kernel has it: any bytes but NUL, not
// always UTF-8 (a Latin-1 "caf\xe9" made by a program). JSON carries text, and
// encoding/json would put U+FFFD for such a byte, naming another file. So a
// byte that is not part of valid UTF-8 travels as the escape of a lone
// surrogate, \udc80..\udcff: Python's "surrogateescape", which is how the host
// holds such a name (os.fsdecode), and such escapes in a request are turned
// back into the bytes. Valid UTF-8 is encoded as encoding/json does.
type fsName string

func (n fsName) MarshalJSON() ([]byte, error) {
	s := string(n)
	if utf8.ValidString(s) {
		return json.Marshal(s)
	}
	b := []byte{'"'}
	for len(s) > 0 {
		valid := 0 // the longest valid UTF-8 prefix, encoded in one piece
		for valid < len(s) {
			r, size := utf8.DecodeRuneInString(s[valid:])
			if r == utf8.RuneError && size <= 1 {
				break
			}
			valid += size
		}
		if valid > 0 {
			q, err := json.Marshal(s[:valid])
			if err != nil {
				return nil, err
			}
			b = append(b, q[1:len(q)-1]...)
			s = s[valid:]
			continue
		}
		b = fmt.Appendf(b, `\udc%02x`, s[0])
		s = s[1:]
	}
	return append(b, '"'), nil
}

var errLoneSurrogate = errors.New("a \\u escape is a lone surrogate that stands for no byte " +
	"(only \\udc80..\\udcff do: the bytes 0x80..0xff of a name that is not UTF-8)")

// UnmarshalJSON takes a JSON string (encoding/json has checked its syntax).
func (n *fsName) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return err
	}
	if !containsEscapedSurrogate(data) {
		*n = fsName(s)
		return nil
	}
	raw, err := unquoteSurrogateEscaped(data)
	if err != nil {
		return err
	}
	*n = fsName(raw)
	return nil
}

// containsEscapedSurrogate reports whether a JSON string holds a \ud800..\udfff
// escape, the only case encoding/json decodes differently from fsName.
func containsEscapedSurrogate(data []byte) bool {
	for i := 0; i+5 < len(data); i++ {
		if data[i] != '\\' {
			continue
		}
		if data[i+1] == 'u' && (data[i+2] == 'd' || data[i+2] == 'D') {
			switch data[i+3] {
			case '8', '9', 'a', 'b', 'c', 'd', 'e', 'f', 'A', 'B', 'C', 'D', 'E', 'F':
				return true
			}
		}
		i++ // the escaped character: `\\u...` is a backslash, then text
	}
	return false
}

// unquoteSurrogateEscaped decodes a syntactically valid JSON string: a pair of
// surrogate escapes is one character, a lone \udc80..\udcff the byte 0x80..0xff.
func unquoteSurrogateEscaped(data []byte) (string, error) {
	body := data[1 : len(data)-1]
	out := make([]byte, 0, len(body))
	for i := 0; i < len(body); {
		c := body[i]
		if c != '\\' {
			out = append(out, c)
			i++
			continue
		}
		switch e := body[i+1]; e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, err := hex4(body[i+2:])
			if err != nil {
				return "", err
			}
			i += 6
			switch {
			case utf16.IsSurrogate(r) && r < 0xdc00: // high: a low one must follow
				if i+6 <= len(body) && body[i] == '\\' && body[i+1] == 'u' {
					if lo, err := hex4(body[i+2:]); err == nil && lo >= 0xdc00 && lo <= 0xdfff {
						out = utf8.AppendRune(out, utf16.DecodeRune(r, lo))
						i += 6
						continue
					}
				}
				return "", errLoneSurrogate
			case r >= 0xdc80 && r <= 0xdcff:
				out = append(out, byte(r-0xdc00))
			case utf16.IsSurrogate(r):
				return "", errLoneSurrogate
			default:
				out = utf8.AppendRune(out, r)
			}
			continue
		default:
			return "", fmt.Errorf("invalid escape \\%c", e)
		}
		i += 2
	}
	return string(out), nil
}

func hex4(b []byte) (rune, error) {
	if len(b) < 4 {
		return 0, errors.New("short \\u escape")
	}
	v, err := strconv.ParseUint(string(b[:4]), 16, 16)
	if err != nil {
		return 0, fmt.Errorf("invalid \\u escape %q", b[:4])
	}
	return rune(v), nil
}
