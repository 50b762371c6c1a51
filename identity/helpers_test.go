package identity_test

import (
	"crypto/x509"
	"encoding/pem"
	"io"
)

type x509Cert = x509.Certificate

func pemEncode(w io.Writer, der []byte) { pem.Encode(w, &pem.Block{Type: "CERTIFICATE", Bytes: der}) }
