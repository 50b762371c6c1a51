package mesh

import (
	"strings"
	"unicode/utf8"
)

// expand replaces $(NAME) references in s as the kubelet does for an env var's value: a port of
// k8s.io/kubernetes third_party/forked/golang/expansion/expand.go (Expand, tryReadVariableName;
// Apache 2.0, The Kubernetes Authors). $$ is a literal $; a reference to a name lookup does not
// know stays as written, $(NAME); an unterminated $( and a $ before anything but ( or $ are kept.
func expand(s string, lookup func(string) (string, bool)) string {
	var b strings.Builder
	checkpoint := 0
	for cursor := 0; cursor < len(s); cursor++ {
		if s[cursor] != '$' || cursor+1 >= len(s) {
			continue
		}
		b.WriteString(s[checkpoint:cursor])
		read, isVar, advance := readVariableName(s[cursor+1:])
		switch {
		case !isVar:
			b.WriteString(read)
		default:
			if v, ok := lookup(read); ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + read + ")")
			}
		}
		cursor += advance
		checkpoint = cursor + 1
	}
	return b.String() + s[checkpoint:]
}

// readVariableName reads what follows a $: the text to write, whether it is a variable name to
// look up, and how many bytes it took.
func readVariableName(s string) (string, bool, int) {
	r, size := utf8.DecodeRuneInString(s)
	switch r {
	case '$': // an escaped operator
		return s[:size], false, size
	case '(':
		if i := strings.IndexByte(s[1:], ')'); i >= 0 {
			return s[1 : i+1], true, i + 2
		}
		return "$(", false, 1 // incomplete: kept, and the rest read on
	}
	return "$" + string(r), false, size
}
