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

// Buffered is the number of received bytes no reader has consumed yet on srv's connections.
func Buffered(srv *Server) int {
	srv.mu.Lock()
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	n := 0
	for _, c := range conns {
		c.mu.Lock()
		streams := make([]*Stream, 0, len(c.streams))
		for _, s := range c.streams {
			streams = append(streams, s)
		}
		c.mu.Unlock()
		for _, s := range streams {
			s.mu.Lock()
			for _, ch := range s.chunks {
				n += ch.w - ch.r
			}
			s.mu.Unlock()
		}
	}
	return n
}
