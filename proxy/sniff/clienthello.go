package sniff

// clientHelloSNI reads the server name from a TLS ClientHello at the start of b. complete is false
// while b ends before the ClientHello does; ok is false when b is not a ClientHello at all.
// Only the first record is read (a ClientHello fragmented over records yields no SNI).
func clientHelloSNI(b []byte) (sni string, complete, ok bool) {
	// Record: type 0x16, version 0x03 0x0X, length.
	if len(b) < 5 {
		if len(b) >= 2 && b[1] != 0x03 {
			return "", true, false
		}
		return "", false, true
	}
	if b[1] != 0x03 {
		return "", true, false
	}
	recLen := int(b[3])<<8 | int(b[4])
	if recLen < 4 || recLen > 1<<14+256 {
		return "", true, false
	}
	if len(b) < 5+recLen {
		if len(b) >= 6 && b[5] != 0x01 {
			return "", true, false
		}
		return "", false, true
	}
	r := reader{b: b[5 : 5+recLen]}
	if t, _ := r.u8(); t != 0x01 { // ClientHello
		return "", true, false
	}
	hsLen, ok := r.u24()
	if !ok {
		return "", true, false
	}
	if hsLen > len(r.b) {
		return "", true, true // fragmented over records: TLS, no SNI from this record
	}
	r.b = r.b[:hsLen]
	if !r.skip(2 + 32) { // version, random
		return "", true, false
	}
	if !r.skipVec8() || !r.skipVec16() || !r.skipVec8() { // session id, cipher suites, compression
		return "", true, false
	}
	if len(r.b) == 0 {
		return "", true, true // no extensions
	}
	exts, ok := r.vec16()
	if !ok {
		return "", true, false
	}
	er := reader{b: exts}
	for len(er.b) > 0 {
		typ, ok1 := er.u16()
		data, ok2 := er.vec16()
		if !ok1 || !ok2 {
			return "", true, false
		}
		if typ != 0 { // server_name
			continue
		}
		sr := reader{b: data}
		list, ok := sr.vec16()
		if !ok {
			return "", true, false
		}
		lr := reader{b: list}
		for len(lr.b) > 0 {
			nameType, ok1 := lr.u8()
			name, ok2 := lr.vec16()
			if !ok1 || !ok2 {
				return "", true, false
			}
			if nameType == 0 {
				return string(name), true, true
			}
		}
	}
	return "", true, true
}

// reader reads big-endian TLS fields, never past its bytes.
type reader struct{ b []byte }

func (r *reader) u8() (int, bool) {
	if len(r.b) < 1 {
		return 0, false
	}
	v := int(r.b[0])
	r.b = r.b[1:]
	return v, true
}

func (r *reader) u16() (int, bool) {
	if len(r.b) < 2 {
		return 0, false
	}
	v := int(r.b[0])<<8 | int(r.b[1])
	r.b = r.b[2:]
	return v, true
}

func (r *reader) u24() (int, bool) {
	if len(r.b) < 3 {
		return 0, false
	}
	v := int(r.b[0])<<16 | int(r.b[1])<<8 | int(r.b[2])
	r.b = r.b[3:]
	return v, true
}

func (r *reader) skip(n int) bool {
	if len(r.b) < n {
		return false
	}
	r.b = r.b[n:]
	return true
}

func (r *reader) vec16() ([]byte, bool) {
	n, ok := r.u16()
	if !ok || len(r.b) < n {
		return nil, false
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v, true
}

func (r *reader) skipVec8() bool {
	n, ok := r.u8()
	return ok && r.skip(n)
}

func (r *reader) skipVec16() bool {
	_, ok := r.vec16()
	return ok
}
