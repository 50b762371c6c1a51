package hbone

import (
	"context"
	"time"
)

// streamContext is a Stream's Context: the Stream itself, so that a stream nobody asks about
// holds no context. Its Done channel is made on the first Done call and closed by finish, and
// it implements context's afterFuncer (AfterFunc), so a context derived from it (WithTimeout,
// WithCancel, context.AfterFunc) registers a callback here instead of a goroutine, and leaves
// nothing behind once it is cancelled. Guarded by the Stream's mu, like ended.
type streamContext Stream

// afterFunc is one context.AfterFunc callback, in a list from Stream.afters.
type afterFunc struct {
	f    func()
	next *afterFunc
}

// closedChan is the Done channel of a stream that ended before anyone asked for it.
var closedChan = func() chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}()

func (sc *streamContext) Deadline() (time.Time, bool) { return time.Time{}, false }

func (sc *streamContext) Value(any) any { return nil }

func (sc *streamContext) Done() <-chan struct{} {
	s := (*Stream)(sc)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		if s.ended {
			return closedChan
		}
		s.done = make(chan struct{})
	}
	return s.done
}

func (sc *streamContext) Err() error {
	s := (*Stream)(sc)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return context.Canceled
	}
	return nil
}

// AfterFunc runs f in its own goroutine once the stream ends (at once if it has); stop removes
// f and reports whether it did so before f started, as context.AfterFunc documents.
func (sc *streamContext) AfterFunc(f func()) (stop func() bool) {
	s := (*Stream)(sc)
	a := &afterFunc{f: f}
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		go f()
		return func() bool { return false }
	}
	a.next, s.afters = s.afters, a
	s.mu.Unlock()
	return func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for p := &s.afters; *p != nil; p = &(*p).next {
			if *p == a {
				*p = a.next
				return true
			}
		}
		return false
	}
}

func (sc *streamContext) String() string { return "hbone.Stream.Context" }
