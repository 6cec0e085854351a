// application/x-www-form-urlencoded, one value at a time: what a client-credentials request and
// HTTP Basic credentials are built with (RFC 6749 §2.3.1, Appendix B), and so also what the
// response parser must recognise when an endpoint echoes them back.

/** One value form-encoded as the WHATWG URL standard does it (space as `+`). */
export function formEncode(value: string): string {
  return new URLSearchParams([['', value]]).toString().slice(1);
}
