package waypoint_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/detour-mesh/detour/proxy/route"
)

// forwardApp answers the app paths the forwarding tests use; false for any other path.
func forwardApp(w http.ResponseWriter, r *http.Request) bool {
	switch r.URL.Path {
	case "/hop": // what arrived of the hop-by-hop headers; a response carrying its own
		io.ReadAll(r.Body)
		var seen []string
		for _, k := range []string{"Connection", "X-Conn-Named", "Keep-Alive", "Proxy-Authorization", "Te", "User-Agent", "X-End-To-End"} {
			if v, ok := r.Header[k]; ok {
				seen = append(seen, k+"="+strings.Join(v, ","))
			}
		}
		w.Header().Set("Connection", "X-Resp-Named")
		w.Header().Set("X-Resp-Named", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Resp-Kept", "1")
		io.WriteString(w, strings.Join(seen, " "))
	case "/trailers": // echoes the request trailer; an announced and an unannounced response trailer
		io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Announced")
		io.WriteString(w, "body")
		w.Header().Set("X-Announced", "a")
		w.Header().Set(http.TrailerPrefix+"X-Unannounced", "u")
		w.Header().Set(http.TrailerPrefix+"X-Req-Trailer", r.Trailer.Get("X-Req-Trailer"))
	case "/early-hints": // a 103 before the answer
		io.ReadAll(r.Body)
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		io.WriteString(w, "final")
	case "/paced": // a response of known length sent in two pieces; the second once the test asks
		io.ReadAll(r.Body)
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "first")
		http.NewResponseController(w).Flush()
		<-pacedNext
		io.WriteString(w, "secnd")
	case "/cut": // promises 100 bytes, sends 5, then closes
		io.ReadAll(r.Body)
		w.Header().Set("Content-Length", "100")
		io.WriteString(w, "short")
		http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler)
	case "/upgrade": // switches to an echo of one line
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		defer conn.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", r.Header.Get("Upgrade"))
		brw.Flush()
		line, _ := brw.ReadString('\n')
		io.WriteString(conn, "echo: "+line)
	default:
		return false
	}
	return true
}

var pacedNext = make(chan struct{}, 1)

// Hop-by-hop headers (and those the Connection header names) stop at the waypoint both ways;
// "TE: trailers" goes on (gRPC needs it); a request without User-Agent gets none from the
// waypoint's own client; end-to-end headers pass.
func TestForwardHopByHopHeaders(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
			c, _ := b.httpClient(t, h2)
			hdr := []string{"Te", "trailers", "X-End-To-End", "1", "User-Agent", ""}
			want := "Te=trailers X-End-To-End=1"
			if !h2 { // HTTP/2 has no connection-specific headers to send
				hdr = append(hdr, "Connection", "X-Conn-Named", "X-Conn-Named", "1", "Keep-Alive", "timeout=5",
					"Proxy-Authorization", "Basic eDp5")
			}
			code, body, rh := get(t, c, "http://10.96.0.20:80/hop", hdr...)
			if code != 200 || body != want {
				t.Fatalf("app saw %q (%d), want %q", body, code, want)
			}
			gone := []string{"Keep-Alive", "Connection"}
			if !h2 { // an HTTP/2 app's server drops its Connection header itself
				gone = append(gone, "X-Resp-Named")
			}
			for _, k := range gone {
				if v, ok := rh[k]; ok {
					t.Errorf("client got hop-by-hop %s: %q", k, v)
				}
			}
			if rh.Get("X-Resp-Kept") != "1" {
				t.Errorf("client lost an end-to-end header: %v", rh)
			}
		})
	}
}

// Trailers pass both ways: a request's trailer reaches the app after the body, and the
// response's trailers, announced or not, reach the client.
func TestForwardTrailers(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
			c, _ := b.httpClient(t, h2)
			req, _ := http.NewRequest("POST", "http://10.96.0.20:80/trailers", io.NopCloser(strings.NewReader("request")))
			req.ContentLength = -1
			req.Trailer = http.Header{"X-Req-Trailer": {"r"}}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if body, err := io.ReadAll(resp.Body); err != nil || string(body) != "body" {
				t.Fatalf("body %q, %v", body, err)
			}
			got := fmt.Sprintf("%s %s %s", resp.Trailer.Get("X-Announced"), resp.Trailer.Get("X-Unannounced"), resp.Trailer.Get("X-Req-Trailer"))
			if got != "a u r" {
				t.Fatalf("trailers %v, want X-Announced a, X-Unannounced u, X-Req-Trailer r", resp.Trailer)
			}
		})
	}
}

// A 1xx the app sends (103 Early Hints) reaches the client before the answer, with its headers.
func TestForwardInformational(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
			c, _ := b.httpClient(t, h2)
			var hints []string
			trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
				hints = append(hints, fmt.Sprintf("%d %s", code, h.Get("Link")))
				return nil
			}}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "POST",
				"http://10.96.0.20:80/early-hints", strings.NewReader(pingBody))
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if len(hints) != 1 || hints[0] != "103 </style.css>; rel=preload" || string(body) != "final" {
				t.Fatalf("1xx %q, then %q", hints, body)
			}
		})
	}
}

// A client sending "Expect: 100-continue" gets to send its body and the answer.
func TestForwardExpectContinue(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
	c, _ := b.httpClient(t, false)
	c.Transport.(*http.Transport).ExpectContinueTimeout = time.Hour // the body waits for the 100
	code, body, _ := get(t, c, "http://10.96.0.20:80/echo", "Expect", "100-continue")
	if code != 200 || !strings.HasSuffix(body, "body="+pingBody) {
		t.Fatalf("%d %q", code, body)
	}
}

// A response of known length that the app sends in pieces reaches the client piece by piece
// (the waypoint does not hold a piece until the end), and a response the app cuts short is cut
// for the client too (an error, not a shorter body taken for whole: the waypoint resets the
// client's stream).
func TestForwardPacedAndCut(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
	c, _ := b.httpClient(t, false)
	resp, err := c.Post("http://10.96.0.20:80/paced", "text/plain", strings.NewReader(pingBody))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	first := make([]byte, 5)
	if _, err := io.ReadFull(br, first); err != nil || string(first) != "first" {
		t.Fatalf("first piece %q, %v", first, err)
	}
	pacedNext <- struct{}{}
	if rest, err := io.ReadAll(br); err != nil || string(rest) != "secnd" {
		t.Fatalf("second piece %q, %v", rest, err)
	}

	resp, err = c.Post("http://10.96.0.20:80/cut", "text/plain", strings.NewReader(pingBody))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if body, err := io.ReadAll(resp.Body); err == nil {
		t.Fatalf("a cut response read as %q with no error", body)
	}
}

// An Upgrade request (here a made-up protocol, as a WebSocket would) switches protocols end to
// end: the 101 reaches the client, then bytes flow both ways.
func TestForwardUpgrade(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.client.Dial(ctx, b.waypoint, "10.96.0.20:80", b.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	io.WriteString(s, "GET /upgrade HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: lines\r\n\r\n")
	br := bufio.NewReader(s)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "lines" {
		t.Fatalf("%v, %v", resp, err)
	}
	io.WriteString(s, "hello\n")
	if line, err := br.ReadString('\n'); err != nil || line != "echo: hello\n" {
		t.Fatalf("after the switch: %q, %v", line, err)
	}
}
