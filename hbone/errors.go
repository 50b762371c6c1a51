package hbone

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"

	"golang.org/x/net/http2"
)

// Sentinels a Handler wraps to choose the CONNECT status; see Status.
var (
	// ErrBadAuthority: the :authority is not a valid host:port (400).
	ErrBadAuthority = errors.New("hbone: malformed authority")
	// ErrForbidden: policy refused the stream (403).
	ErrForbidden = errors.New("hbone: forbidden")
	// ErrUnavailable: no upstream can take the stream (503).
	ErrUnavailable = errors.New("hbone: upstream unavailable")
	// ErrServerClosed is returned by Serve after Shutdown or Close.
	ErrServerClosed = errors.New("hbone: server closed")
	// ErrConnClosed: the HTTP/2 connection under a stream is gone.
	ErrConnClosed = errors.New("hbone: connection closed")
	// ErrStreamClosed: Read or Write after Close, or Write after CloseWrite.
	ErrStreamClosed = errors.New("hbone: stream closed")
	// ErrPingTimeout: the peer did not answer a keepalive ping in time.
	ErrPingTimeout = errors.New("hbone: keepalive ping timed out")
	// ErrWriteStalled: frames waited a ping timeout for a peer that does not read.
	ErrWriteStalled = errors.New("hbone: writes stalled: the peer does not read")
)

// StatusError is a non-200 answer to a CONNECT, as the Dialer sees it, or a status a Handler
// wants to send as is.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: CONNECT answered %d %s", e.Code, http.StatusText(e.Code))
}

// ResetError is a stream ended by RST_STREAM.
type ResetError struct {
	Code   http2.ErrCode
	Remote bool // the peer sent it
}

func (e *ResetError) Error() string {
	if e.Remote {
		return "hbone: stream reset by peer: " + e.Code.String()
	}
	return "hbone: stream reset: " + e.Code.String()
}

// connError is a connection-level protocol error: GOAWAY with code, then close.
type connError struct {
	code   http2.ErrCode
	reason string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: connection error %v: %s", e.code, e.reason)
}

// Status maps a handler's error to the one CONNECT status the server sends for it:
// 400 malformed authority, 403 forbidden, 503 refused or unreachable upstream, 504 dial timeout,
// 502 anything else. It is applied once, at the server boundary.
func Status(err error) int {
	var se *StatusError
	var ne net.Error
	switch {
	case err == nil:
		return http.StatusOK
	case errors.As(err, &se):
		return se.Code
	case errors.Is(err, ErrBadAuthority):
		return http.StatusBadRequest
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrUnavailable), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, syscall.EHOSTDOWN), errors.Is(err, syscall.ECONNRESET):
		return http.StatusServiceUnavailable
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return http.StatusGatewayTimeout
	default:
		return http.StatusBadGateway
	}
}
