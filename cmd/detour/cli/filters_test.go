package cli

import (
	"reflect"
	"strings"
	"testing"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

func TestParseHeader(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want tunnel.HeaderMatch
		err  string
	}{
		{"x-dev=alice", tunnel.HeaderMatch{Name: "x-dev", Value: "alice"}, ""},
		{"x-dev: alice", tunnel.HeaderMatch{Name: "x-dev", Value: "alice"}, ""},
		{"x-dev:alice", tunnel.HeaderMatch{Name: "x-dev", Value: "alice"}, ""},
		{"x-dev~^al(ice|an)$", tunnel.HeaderMatch{Name: "x-dev", Regex: "^al(ice|an)$"}, ""},
		{"x-dev", tunnel.HeaderMatch{Name: "x-dev"}, ""},
		{"x-dev=a=b:c", tunnel.HeaderMatch{Name: "x-dev", Value: "a=b:c"}, ""},
		{"x-dev~a=b", tunnel.HeaderMatch{Name: "x-dev", Regex: "a=b"}, ""},
		{"", tunnel.HeaderMatch{}, `--header "": no header name; want NAME=VALUE, NAME:VALUE, NAME~REGEX or NAME`},
		{"=alice", tunnel.HeaderMatch{}, `--header "=alice": no header name; want NAME=VALUE, NAME:VALUE, NAME~REGEX or NAME`},
		{":authority:x", tunnel.HeaderMatch{}, `--header ":authority:x": no header name; want NAME=VALUE, NAME:VALUE, NAME~REGEX or NAME`},
		{"x dev=alice", tunnel.HeaderMatch{}, `--header "x dev=alice": "x dev" is not a header name (letters, digits and !#$%&'*+-.^_` + "`" + `|~ only)`},
		{"x-dév=a", tunnel.HeaderMatch{}, `--header "x-dév=a": "x-dév" is not a header name (letters, digits and !#$%&'*+-.^_` + "`" + `|~ only)`},
		{"x-dev=", tunnel.HeaderMatch{}, `--header "x-dev=": an empty value; to match any value give the name alone`},
		{"x-dev:  ", tunnel.HeaderMatch{}, `--header "x-dev:  ": an empty value; to match any value give the name alone`},
		{"x-dev~", tunnel.HeaderMatch{}, `--header "x-dev~": an empty regex; to match any value give the name alone`},
		{"x-dev=a\x00b", tunnel.HeaderMatch{}, `--header "x-dev=a\x00b": the value holds a control character`},
		{"x-dev~(", tunnel.HeaderMatch{}, "--header \"x-dev~(\": header regex: error parsing regexp: missing closing ): `(`"},
		{"x-dev~" + strings.Repeat("a{1000}", 20), tunnel.HeaderMatch{}, `--header "x-dev~` + strings.Repeat("a{1000}", 20) + `": the header regex expands to more than 10000 instructions: use fewer or smaller counted repetitions ({n})`},
	} {
		got, err := parseHeader(tc.arg)
		if errString(err) != tc.err || got != tc.want {
			t.Errorf("%q: %+v %q, want %+v %q", tc.arg, got, errString(err), tc.want, tc.err)
		}
	}
}

func TestParseFilter(t *testing.T) {
	f, err := parseFilter([]string{"x-dev=alice", "x-team~^pay", "x-debug"}, "^/api", "get")
	want := tunnel.Filter{Header: "x-dev", HeaderValue: "alice", Headers: []tunnel.HeaderMatch{{Name: "x-team", Regex: "^pay"}, {Name: "x-debug"}},
		Path: "^/api", Method: "GET"}
	if err != nil || !reflect.DeepEqual(f, want) {
		t.Fatalf("%+v %v", f, err)
	}
	if got := filterText(f); got != "header x-dev=alice, header x-team~^pay, header x-debug, path ~^/api, method GET" {
		t.Errorf("filterText: %q", got)
	}
	for _, tc := range []struct {
		headers      []string
		path, method string
		err          string
	}{
		{[]string{"a", "b", "c", "d", "e", "f", "g", "h", "i"}, "", "", "--header: 9 given, at most 8"},
		{nil, "[a", "", "--path \"[a\": path regex: error parsing regexp: missing closing ]: `[a`"},
		{nil, "", "GE T", `--method "GE T": not an HTTP method`},
		{[]string{"x-dev=alice", "bad name"}, "", "", `--header "bad name": "bad name" is not a header name (letters, digits and !#$%&'*+-.^_` + "`" + `|~ only)`},
	} {
		if _, err := parseFilter(tc.headers, tc.path, tc.method); errString(err) != tc.err {
			t.Errorf("%v %q %q: %q, want %q", tc.headers, tc.path, tc.method, errString(err), tc.err)
		}
	}
}

func TestParseTo(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"8080", "127.0.0.1:8080", ""},
		{":8080", "127.0.0.1:8080", ""},
		{"localhost:3000", "localhost:3000", ""},
		{"[::1]:3000", "[::1]:3000", ""},
		{"", "", "--to is required: where your local app listens, PORT (on 127.0.0.1) or HOST:PORT"},
		{"0", "", `--to "0": port "0" is not a number from 1 to 65535`},
		{"65536", "", `--to "65536": port "65536" is not a number from 1 to 65535`},
		{"localhost", "", `--to "localhost": port "localhost" is not a number from 1 to 65535`},
		{"localhost:http", "", `--to "localhost:http": port "http" is not a number from 1 to 65535`},
		{"::1:80", "", `--to "::1:80": want PORT or HOST:PORT`},
	} {
		got, err := parseTo(tc.in)
		if got != tc.want || errString(err) != tc.err {
			t.Errorf("%q: %q %q, want %q %q", tc.in, got, errString(err), tc.want, tc.err)
		}
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func FuzzParseHeader(f *testing.F) {
	for _, s := range []string{"x-dev=alice", "x-dev: alice", "x~^a", "x", "", "=", "~(", "a:b=c~d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, arg string) {
		h, err := parseHeader(arg)
		if err != nil {
			return
		}
		// What is accepted is a valid condition the waypoint accepts too, in either wire form.
		if h.Name == "" || h.Value != "" && h.Regex != "" {
			t.Fatalf("%q: accepted %+v", arg, h)
		}
		if _, err := parseFilter([]string{arg}, "", ""); err != nil {
			t.Fatalf("%q: parseHeader accepted, parseFilter refused: %v", arg, err)
		}
	})
}
