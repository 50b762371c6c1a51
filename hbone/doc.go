// Package hbone speaks HBONE, Istio ambient's tunnel: HTTP/2 CONNECT over mutual TLS 1.3, port
// 15008. Server terminates it and hands each CONNECT to a Handler as a Stream; Dialer opens
// streams through a pool of connections, including double HBONE through a gateway. Both sides
// use ztunnel's HTTP/2 settings and carry half-close end to end. See README.md for the wire
// contract and where each rule comes from.
package hbone
