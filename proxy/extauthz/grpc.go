package extauthz

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
)

// grpcProvider is the gRPC form (envoyExtAuthzGrpc): envoy.service.auth.v3.Authorization/Check
// over one client connection (HTTP/2, calls multiplexed), as Envoy's ext_authz filter. The
// request's attributes carry the client's address and SPIFFE ID, the destination, and for HTTP
// every header (keys lower-case, repeated values joined with ","), the method, path, host and,
// with includeRequestBodyInCheck, the body. Status OK allows, with the ok_response's header
// changes; any other status denies with the denied_response (403 without a status); an
// error_response is a failed check with its status, headers and body.
type grpcProvider struct {
	client authv3.AuthorizationClient
	pack   bool // packAsBytes: the body goes in raw_body
}

func newGRPC(c *Checker, p *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider, cfg Config) error {
	dial := cfg.dial()
	// passthrough: the waypoint's resolver resolves the name at every dial, as for HTTP.
	cc, err := grpc.NewClient("passthrough:///"+address(p.GetService(), p.GetPort()),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) }),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxResponseBody+64<<10)))
	if err != nil {
		return err
	}
	g := &grpcProvider{client: authv3.NewAuthorizationClient(cc), pack: p.GetIncludeRequestBodyInCheck().GetPackAsBytes()}
	c.check, c.close = g.check, cc.Close
	return nil
}

func (g *grpcProvider) check(ctx context.Context, r *Request, b *body) (Result, error) {
	resp, err := g.client.Check(ctx, g.request(r, b))
	if err != nil {
		return Result{}, err
	}
	switch hr := resp.GetHttpResponse().(type) {
	case *authv3.CheckResponse_ErrorResponse:
		res := denied(hr.ErrorResponse, 0)
		return res, fmt.Errorf("the provider answered an error (status %s): %s", codes.Code(resp.GetStatus().GetCode()), resp.GetStatus().GetMessage())
	}
	if codes.Code(resp.GetStatus().GetCode()) != codes.OK {
		return denied(resp.GetDeniedResponse(), http.StatusForbidden), nil
	}
	res := Result{Allow: true}
	ok := resp.GetOkResponse()
	for _, h := range ok.GetHeaders() {
		k, v := h.GetHeader().GetKey(), headerValue(h.GetHeader())
		if k == "" || strings.HasPrefix(k, ":") {
			continue
		}
		switch {
		case h.GetAppend().GetValue():
			res.UpstreamAppend = add(res.UpstreamAppend, k, v)
		case h.GetAppend() == nil && h.GetAppendAction() == corev3.HeaderValueOption_ADD_IF_ABSENT:
			if r.HTTP == nil || r.HTTP.Header.Get(k) == "" {
				res.UpstreamSet = add(res.UpstreamSet, k, v)
			}
		default:
			res.UpstreamSet = add(res.UpstreamSet, k, v)
		}
	}
	res.UpstreamRemove = ok.GetHeadersToRemove()
	for _, h := range ok.GetResponseHeadersToAdd() {
		if k := h.GetHeader().GetKey(); k != "" && !strings.HasPrefix(k, ":") {
			res.Downstream = add(res.Downstream, k, headerValue(h.GetHeader()))
		}
	}
	return res, nil
}

// denied is the answer to the client a denied_response (or error_response) describes; status
// 0 (no status given) is left for the caller's default.
func denied(d *authv3.DeniedHttpResponse, def int) Result {
	res := Result{Status: int(d.GetStatus().GetCode()), Body: []byte(d.GetBody())}
	if res.Status == 0 {
		res.Status = def
	}
	for _, h := range d.GetHeaders() {
		if k := h.GetHeader().GetKey(); k != "" && !strings.HasPrefix(k, ":") && !hopByHop[http.CanonicalHeaderKey(k)] {
			res.Header = add(res.Header, k, headerValue(h.GetHeader()))
		}
	}
	return res
}

func headerValue(h *corev3.HeaderValue) string {
	if h.GetValue() != "" {
		return h.GetValue()
	}
	return string(h.GetRawValue())
}

func add(h http.Header, k, v string) http.Header {
	if h == nil {
		h = http.Header{}
	}
	h.Add(k, v)
	return h
}

// request builds the CheckRequest's attributes (Envoy's CheckRequestUtils): strings made
// valid UTF-8 as Envoy makes them, the body (b non-nil) in body, or raw_body with packAsBytes,
// and PartialBodyHeader in the headers.
func (g *grpcProvider) request(r *Request, b *body) *authv3.CheckRequest {
	attrs := &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Address: socketAddress(r.Source.Addr().String(), r.Source.Port()), Principal: r.Principal},
		Destination: &authv3.AttributeContext_Peer{Address: socketAddress(r.Destination.Addr().String(), r.Destination.Port())},
		Request:     &authv3.AttributeContext_Request{Time: timestamppb.Now()},
	}
	if !r.Source.IsValid() {
		attrs.Source.Address = nil
	}
	if !r.Destination.IsValid() {
		attrs.Destination.Address = nil
	}
	if hr := r.HTTP; hr != nil {
		headers := map[string]string{":authority": hr.Host, ":method": hr.Method, ":path": hr.URL.RequestURI()}
		for k, vs := range hr.Header {
			if k != PartialBodyHeader {
				headers[strings.ToLower(k)] = validUTF8(strings.Join(vs, ","))
			}
		}
		h := &authv3.AttributeContext_HttpRequest{
			Id:       hr.Header.Get("X-Request-Id"),
			Method:   hr.Method,
			Headers:  headers,
			Path:     hr.URL.RequestURI(),
			Host:     hr.Host,
			Scheme:   "http",
			Query:    hr.URL.RawQuery,
			Size:     hr.ContentLength,
			Protocol: hr.Proto,
		}
		if b != nil {
			if g.pack {
				h.RawBody = b.data
			} else {
				h.Body = validUTF8(string(b.data))
			}
			headers[strings.ToLower(PartialBodyHeader)] = b.partialValue()
		}
		attrs.Request.Http = h
	}
	return &authv3.CheckRequest{Attributes: attrs}
}

func socketAddress(ip string, port uint16) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)},
	}}}
}
