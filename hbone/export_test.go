package hbone

// QueuedFrames is the number of frames waiting for the writers of srv's connections, for tests
// that check a peer that never reads cannot grow them.
func QueuedFrames(srv *Server) int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	n := 0
	for c := range srv.conns {
		c.wmu.Lock()
		n += len(c.ctrlQ) + len(c.ordQ)
		c.wmu.Unlock()
	}
	return n
}
