package drain

import "errors"

// ErrTimeout says streams were still open when the drain's timeout ended them.
var ErrTimeout = errors.New("drain: streams still open after the timeout were closed")
