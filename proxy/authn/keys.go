package authn

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Defaults of Keys.
const (
	// DefaultFetchTimeout bounds one fetch: the jwtRules timeout's default in Istio.
	DefaultFetchTimeout = 5 * time.Second
	// DefaultRefresh is how long a fetched key set is used before it is fetched again: istiod's
	// PILOT_JWT_PUB_KEY_REFRESH_INTERVAL.
	DefaultRefresh = 20 * time.Minute
	// DefaultRetry is how long a failed fetch is remembered before the next request tries again.
	DefaultRetry = 5 * time.Second
	// DefaultMaxBytes bounds a key set's body.
	DefaultMaxBytes = 1 << 20
	// maxSets bounds how many jwksUri the cache remembers (each configured one, plus slack).
	maxSets = 1024
)

// Keys fetches the key sets at jwksUri addresses, caches them and fetches them again once
// Refresh has passed. It starts no goroutine: a request that needs a key set no one has yet
// fetches it (others wait for that one fetch); once a set is stale, one request refreshes it while
// the others go on with the stale set, which is also kept when a refresh fails. A set that
// cannot be had fails the tokens that need it (closed), and is retried after Retry. Safe for
// concurrent use; the zero value is ready.
type Keys struct {
	// Client fetches; nil means http.DefaultClient's transport with no redirects beyond Go's.
	Client *http.Client
	// Timeout bounds a fetch whose rule gives none; 0 means DefaultFetchTimeout.
	Timeout time.Duration
	// Refresh: 0 means DefaultRefresh. Retry: 0 means DefaultRetry.
	Refresh, Retry time.Duration
	// MaxBytes bounds a key set's body; 0 means DefaultMaxBytes.
	MaxBytes int64
	// Now is the clock; nil means time.Now.
	Now    func() time.Time
	Logger *slog.Logger // nil means slog.Default()

	mu   sync.Mutex
	sets map[string]*keySet // by jwksUri; owned by mu
}

// keySet is one address's state (a jwksUri's key set, or an issuer's OpenID configuration);
// its fields are owned by Keys.mu.
type keySet struct {
	set      any           // the last good value (*jose.JSONWebKeySet, or the jwks_uri string); nil before
	at       time.Time     // of the last attempt
	err      error         // of the last attempt
	fetching chan struct{} // closed when the fetch under way ends; nil when none
}

// Get is the key set at uri, fetched within timeout (0: Keys.Timeout).
func (k *Keys) Get(ctx context.Context, uri string, timeout time.Duration) (*jose.JSONWebKeySet, error) {
	v, err := k.get(ctx, uri, timeout, func(body []byte) (any, error) { return parseKeySet(uri, body) })
	if err != nil {
		return nil, err
	}
	return v.(*jose.JSONWebKeySet), nil
}

// ForIssuer is the key set of an issuer whose rule names no keys: its jwks_uri from the
// issuer's OpenID configuration (issuer + "/.well-known/openid-configuration"), as istiod
// resolves it (pilot/pkg/model/jwks_resolver.go), then that key set.
func (k *Keys) ForIssuer(ctx context.Context, issuer string, timeout time.Duration) (*jose.JSONWebKeySet, error) {
	where := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	v, err := k.get(ctx, where, timeout, func(body []byte) (any, error) {
		var doc struct {
			JWKSURI string `json:"jwks_uri"`
		}
		if err := json.Unmarshal(body, &doc); err != nil || doc.JWKSURI == "" {
			return nil, fmt.Errorf("%w: %s names no jwks_uri", ErrKeys, where)
		}
		return doc.JWKSURI, nil
	})
	if err != nil {
		return nil, err
	}
	return k.Get(ctx, v.(string), timeout)
}

// get is the cached value at uri, fetched within timeout and decoded by parse.
func (k *Keys) get(ctx context.Context, uri string, timeout time.Duration, parse func([]byte) (any, error)) (any, error) {
	for {
		k.mu.Lock()
		if k.sets == nil {
			k.sets = map[string]*keySet{}
		}
		s := k.sets[uri]
		if s == nil {
			if len(k.sets) >= maxSets {
				clear(k.sets)
			}
			s = &keySet{}
			k.sets[uri] = s
		}
		now := k.now()
		switch {
		case s.set != nil && (now.Sub(s.at) < k.refresh() || s.fetching != nil):
			set := s.set
			k.mu.Unlock()
			return set, nil
		case s.set == nil && s.err != nil && now.Sub(s.at) < k.retry() && s.fetching == nil:
			err := s.err
			k.mu.Unlock()
			return nil, err
		case s.fetching != nil:
			wait := s.fetching
			k.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("%w: waiting for %s: %w", ErrKeys, uri, ctx.Err())
			}
		}
		done := make(chan struct{})
		s.fetching = done
		k.mu.Unlock()

		var set any
		body, err := k.fetch(ctx, uri, timeout)
		if err == nil {
			set, err = parse(body)
		}
		k.mu.Lock()
		s.at, s.err, s.fetching = k.now(), err, nil
		if err == nil {
			s.set = set
		} else {
			k.log().Warn("authn: fetching a key set", "jwksUri", uri, "err", err, "stale", s.set != nil)
			set = s.set // a refresh that fails keeps the last good set
		}
		k.mu.Unlock()
		close(done)
		if set == nil {
			return nil, err
		}
		return set, nil
	}
}

// fetch GETs uri within timeout, whatever becomes of the request that asked (others wait on it).
func (k *Keys) fetch(ctx context.Context, uri string, timeout time.Duration) ([]byte, error) {
	if timeout <= 0 {
		timeout = k.Timeout
	}
	if timeout <= 0 {
		timeout = DefaultFetchTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrKeys, uri, err)
	}
	c := k.Client
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: fetching %s: %w", ErrKeys, uri, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: fetching %s: status %s", ErrKeys, uri, resp.Status)
	}
	max := k.MaxBytes
	if max <= 0 {
		max = DefaultMaxBytes
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, max+1))
	if err != nil {
		return nil, fmt.Errorf("%w: reading %s: %w", ErrKeys, uri, err)
	}
	if int64(len(body)) > max {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrKeys, uri, max)
	}
	return body, nil
}

// parseKeySet decodes a JWKS document; one without a usable public key is refused.
func parseKeySet(where string, body []byte) (*jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrKeys, where, err)
	}
	if len(set.Keys) == 0 {
		return nil, fmt.Errorf("%w: %s has no keys", ErrKeys, where)
	}
	return &set, nil
}

func (k *Keys) now() time.Time {
	if k.Now != nil {
		return k.Now()
	}
	return time.Now()
}

func (k *Keys) refresh() time.Duration {
	if k.Refresh > 0 {
		return k.Refresh
	}
	return DefaultRefresh
}

func (k *Keys) retry() time.Duration {
	if k.Retry > 0 {
		return k.Retry
	}
	return DefaultRetry
}

func (k *Keys) log() *slog.Logger {
	if k.Logger != nil {
		return k.Logger
	}
	return slog.Default()
}
