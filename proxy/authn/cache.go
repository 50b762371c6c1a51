package authn

import (
	"sync"

	"github.com/go-jose/go-jose/v4"
)

// maxVerified bounds the verified-token cache of one Authenticator.
const maxVerified = 1024

// verifiedCache remembers tokens whose signature verified, so a client that sends the same
// token on every request costs one signature check, not one per request (Envoy's jwt_authn
// has the same kind of cache, jwt_cache_config). An entry holds only for the key set it was
// verified with: a refreshed jwksUri set verifies the token again. The time-dependent checks
// (exp, nbf) and the audiences are made on every request. Safe for concurrent use.
type verifiedCache struct {
	mu      sync.Mutex
	entries map[cacheKey]*cached // owned by mu; cleared when full
}

type cacheKey struct {
	rule  *rule
	token string
}

// cached is a verified token, immutable once stored.
type cached struct {
	set     *jose.JSONWebKeySet // the key set it verified with
	claims  map[string]any      // decoded payload, read-only
	payload string
}

// get is the entry for token under rule r; the caller checks it was verified with the rule's
// current key set.
func (c *verifiedCache) get(r *rule, token string) *cached {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.entries[cacheKey{r, token}]
}

func (c *verifiedCache) put(r *rule, token string, e *cached) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) >= maxVerified {
		c.entries = map[cacheKey]*cached{}
	}
	c.entries[cacheKey{r, token}] = e
}
