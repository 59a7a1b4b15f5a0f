//! The tunnel header: what the source enforcer tells the destination enforcer before the
//! first application byte, and the answer. See `docs/wire.md` for the layout.
//!
//! Request (client → server), all integers big-endian:
//! ```text
//! magic "TSRA" | version u8 (=5) | body_len u16 | body
//! body = dst_family u8 (4|6) | dst_addr [4|16] | dst_port u16
//!      | src_workload_len u8 | src_workload utf-8 | src_pid u32 | src_uid u32 | src_cgroup u64
//!      | proof
//! proof = kind u8 (0 none, 1 token, 2 unsigned identity) | len u16 | bytes
//! ```
//! Response (server → client): `version u8 | status u8 | reason_len u8 | reason | code_len u8
//! | code | proof` (the refusal code for flow records, e.g. `replay`, and the destination
//! workload's proof, when there is one).
//!
//! The workload name, pid, uid and cgroup id are hints for flow records; what policy
//! decides on is the identity in the proof (a token sealed by the source enforcer).
//!
//! Version 5 (this one) differs from 4 in the proofs it carries: tokens sealed with the TLS
//! session's key (token version 3, `docs/token.md`), which a version-4 enforcer cannot check.
//! A peer of another version is refused with an error that names both versions.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use crate::code::Code;
use crate::identity::{
    session::Proof,
    token::{MAX_TOKEN, decode_identity, encode_identity},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: [u8; 4] = *b"TSRA";
pub const VERSION: u8 = 6;
/// The HTTP/2 request header of a tunnel stream that carries the request (base64url).
pub const REQUEST_HEADER: &str = "tessera-request";
/// The HTTP/2 response header that carries the answer (base64url).
pub const RESPONSE_HEADER: &str = "tessera-response";
/// Largest body this version accepts; anything longer is refused before allocation.
pub const MAX_BODY: usize = 8192;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("bad magic: not a Tessera tunnel")]
    BadMagic,
    #[error(
        "the peer speaks tunnel protocol version {0}, this enforcer version {VERSION}: \
         upgrade both ends"
    )]
    Version(u8),
    #[error("header body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLong(usize),
    #[error("header truncated: {0}")]
    Truncated(&'static str),
    #[error("malformed header: {0}")]
    Malformed(&'static str),
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Who opened the connection on the source host (the header carries what the source
/// enforcer's capture observed).
pub use crate::capture::Origin as Source;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The destination the application asked for.
    pub dst: SocketAddr,
    pub source: Source,
    /// The source workload's identity.
    pub proof: Proof,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Delivered: the destination accepted the connection.
    Connected = 0,
    /// This enforcer does not serve that destination (not a local workload port).
    NotServed = 1,
    /// The workload refused or could not be reached.
    Unreachable = 2,
    /// The request was malformed.
    BadRequest = 3,
    /// Refused by policy.
    Denied = 4,
    /// The source's proof of identity (its token) was refused.
    Unauthenticated = 5,
}

impl Status {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => Self::Connected,
            1 => Self::NotServed,
            2 => Self::Unreachable,
            3 => Self::BadRequest,
            4 => Self::Denied,
            5 => Self::Unauthenticated,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    /// Why it was refused; on `Connected`, the name of the workload that accepted.
    pub reason: String,
    /// The refusal's short code (`policy`, `replay`, `not-served`, ...); empty on success.
    pub code: Code,
    /// The destination workload's identity (none when there is no such workload, or the
    /// request was refused before one was chosen).
    pub proof: Option<Proof>,
}

fn encode_proof(out: &mut Vec<u8>, proof: Option<&Proof>) {
    let (kind, bytes) = match proof {
        None => (0u8, Vec::new()),
        Some(Proof::Token(t)) => (1, t.clone()),
        Some(Proof::Unsigned(id)) => {
            let mut b = Vec::with_capacity(128);
            encode_identity(&mut b, id);
            (2, b)
        }
    };
    out.push(kind);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(&bytes);
}

fn decode_proof(kind: u8, bytes: &[u8]) -> Result<Option<Proof>, WireError> {
    if bytes.len() > MAX_TOKEN {
        return Err(WireError::TooLong(bytes.len()));
    }
    match kind {
        0 if bytes.is_empty() => Ok(None),
        0 => Err(WireError::Malformed("bytes after an empty proof")),
        1 => Ok(Some(Proof::Token(bytes.to_vec()))),
        2 => decode_identity(bytes)
            .map(|id| Some(Proof::Unsigned(id)))
            .map_err(|_| WireError::Malformed("unsigned identity")),
        _ => Err(WireError::Malformed("unknown proof kind")),
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        match self.dst.ip() {
            IpAddr::V4(ip) => {
                body.push(4);
                body.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                body.push(6);
                body.extend_from_slice(&ip.octets());
            }
        }
        body.extend_from_slice(&self.dst.port().to_be_bytes());
        let name = truncate_utf8(&self.source.workload, u8::MAX as usize);
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&self.source.pid.to_be_bytes());
        body.extend_from_slice(&self.source.uid.to_be_bytes());
        body.extend_from_slice(&self.source.cgroup_id.to_be_bytes());
        encode_proof(&mut body, Some(&self.proof));
        let mut out = Vec::with_capacity(7 + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a body (everything after the 7-byte preamble).
    pub fn decode_body(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(body);
        let dst_ip = match r.u8("dst family")? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>("dst address")?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>("dst address")?)),
            _ => return Err(WireError::Malformed("dst family is neither 4 nor 6")),
        };
        let port = u16::from_be_bytes(r.array("dst port")?);
        if port == 0 {
            return Err(WireError::Malformed("dst port 0"));
        }
        let name_len = r.u8("workload length")? as usize;
        let name = r.take(name_len, "workload name")?;
        let workload = std::str::from_utf8(name)
            .map_err(|_| WireError::Malformed("workload name is not UTF-8"))?
            .to_owned();
        let pid = u32::from_be_bytes(r.array("pid")?);
        let uid = u32::from_be_bytes(r.array("uid")?);
        let cgroup_id = u64::from_be_bytes(r.array("cgroup id")?);
        let kind = r.u8("proof kind")?;
        let len = u16::from_be_bytes(r.array("proof length")?) as usize;
        let proof = decode_proof(kind, r.take(len, "proof")?)?.ok_or(WireError::Malformed(
            "a request without a proof of identity",
        ))?;
        if !r.0.is_empty() {
            return Err(WireError::Malformed("trailing bytes after header body"));
        }
        Ok(Self {
            dst: SocketAddr::new(dst_ip, port),
            source: Source {
                workload,
                pid,
                uid,
                cgroup_id,
            },
            proof,
        })
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
        let mut pre = [0u8; 7];
        read_exact(r, &mut pre, "preamble").await?;
        if pre[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if pre[4] != VERSION {
            return Err(WireError::Version(pre[4]));
        }
        let len = u16::from_be_bytes([pre[5], pre[6]]) as usize;
        if len > MAX_BODY {
            return Err(WireError::TooLong(len));
        }
        let mut body = vec![0u8; len];
        read_exact(r, &mut body, "body").await?;
        Self::decode_body(&body)
    }
}

impl Response {
    pub fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            code: Code::Clean,
            proof: None,
        }
    }

    pub fn with_code(mut self, code: Code) -> Self {
        self.code = code;
        self
    }

    pub fn with_proof(mut self, proof: Proof) -> Self {
        self.proof = Some(proof);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let reason = truncate_utf8(&self.reason, u8::MAX as usize);
        let mut out = Vec::with_capacity(64 + reason.len());
        out.extend_from_slice(&[VERSION, self.status as u8, reason.len() as u8]);
        out.extend_from_slice(reason.as_bytes());
        let code = self.code.as_str();
        out.push(code.len() as u8);
        out.extend_from_slice(code.as_bytes());
        encode_proof(&mut out, self.proof.as_ref());
        out
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
        let mut head = [0u8; 3];
        read_exact(r, &mut head, "response").await?;
        if head[0] != VERSION {
            return Err(WireError::Version(head[0]));
        }
        let status = Status::from_u8(head[1])?;
        let mut reason = vec![0u8; head[2] as usize];
        read_exact(r, &mut reason, "response reason").await?;
        let reason =
            String::from_utf8(reason).map_err(|_| WireError::Malformed("reason is not UTF-8"))?;
        let mut len = [0u8; 1];
        read_exact(r, &mut len, "response code").await?;
        let mut code = vec![0u8; len[0] as usize];
        read_exact(r, &mut code, "response code").await?;
        let code = std::str::from_utf8(&code)
            .ok()
            .and_then(|c| c.parse::<Code>().ok())
            .ok_or(WireError::Malformed("unknown refusal code"))?;
        let mut head = [0u8; 3];
        read_exact(r, &mut head, "response proof").await?;
        let len = u16::from_be_bytes([head[1], head[2]]) as usize;
        if len > MAX_TOKEN {
            return Err(WireError::TooLong(len));
        }
        let mut bytes = vec![0u8; len];
        read_exact(r, &mut bytes, "response proof").await?;
        Ok(Self {
            status,
            reason,
            code,
            proof: decode_proof(head[0], &bytes)?,
        })
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }
}

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};

impl Request {
    /// Decodes a whole request (preamble and body); nothing may follow it.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        if r.take(4, "preamble")? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.u8("preamble")?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let len = u16::from_be_bytes(r.array("preamble")?) as usize;
        if len > MAX_BODY {
            return Err(WireError::TooLong(len));
        }
        let body = r.take(len, "body")?;
        if !r.0.is_empty() {
            return Err(WireError::Malformed("trailing bytes after header body"));
        }
        Self::decode_body(body)
    }

    /// The request as the value of a stream's [`REQUEST_HEADER`].
    pub fn to_header(&self) -> String {
        B64.encode(self.encode())
    }

    /// The request carried in a stream's [`REQUEST_HEADER`].
    pub fn from_header(value: &[u8]) -> Result<Self, WireError> {
        Self::decode(&unbase64(value)?)
    }
}

impl Response {
    /// Decodes a whole answer; nothing may follow it.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        let version = r.u8("response")?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let status = Status::from_u8(r.u8("response")?)?;
        let len = r.u8("response")? as usize;
        let reason = std::str::from_utf8(r.take(len, "response reason")?)
            .map_err(|_| WireError::Malformed("reason is not UTF-8"))?
            .to_owned();
        let len = r.u8("response code")? as usize;
        let code = std::str::from_utf8(r.take(len, "response code")?)
            .ok()
            .and_then(|c| c.parse::<Code>().ok())
            .ok_or(WireError::Malformed("unknown refusal code"))?;
        let kind = r.u8("response proof")?;
        let len = u16::from_be_bytes(r.array("response proof")?) as usize;
        if len > MAX_TOKEN {
            return Err(WireError::TooLong(len));
        }
        let proof = decode_proof(kind, r.take(len, "response proof")?)?;
        if !r.0.is_empty() {
            return Err(WireError::Malformed("trailing bytes after the answer"));
        }
        Ok(Self {
            status,
            reason,
            code,
            proof,
        })
    }

    /// The answer as the value of a stream's [`RESPONSE_HEADER`].
    pub fn to_header(&self) -> String {
        B64.encode(self.encode())
    }

    /// The answer carried in a stream's [`RESPONSE_HEADER`].
    pub fn from_header(value: &[u8]) -> Result<Self, WireError> {
        Self::decode(&unbase64(value)?)
    }
}

/// A header value's bytes; the length is checked before decoding (a header list is bounded
/// by HTTP/2's own limit too).
fn unbase64(value: &[u8]) -> Result<Vec<u8>, WireError> {
    if value.len() > (7 + MAX_BODY).div_ceil(3) * 4 {
        return Err(WireError::TooLong(value.len()));
    }
    B64.decode(value)
        .map_err(|_| WireError::Malformed("header value is not base64url"))
}

async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated(what)),
        Err(e) => Err(e.into()),
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The request every protocol test starts from (`mux`'s tests share it).
    pub(crate) fn sample() -> Request {
        Request {
            dst: "10.77.0.2:8080".parse().unwrap(),
            source: Source {
                workload: "web".into(),
                pid: 42,
                uid: 1000,
                cgroup_id: 7,
            },
            proof: Proof::Token(vec![0xAB; 157]),
        }
    }

    #[tokio::test]
    async fn request_round_trips_v4_and_v6() {
        for dst in ["10.77.0.2:8080", "[fd00::2]:443"] {
            let req = Request {
                dst: dst.parse().unwrap(),
                ..sample()
            };
            let bytes = req.encode();
            let got = Request::read(&mut bytes.as_slice()).await.unwrap();
            assert_eq!(got, req);
        }
    }

    #[tokio::test]
    async fn every_truncation_is_rejected() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let err = Request::read(&mut &bytes[..cut]).await.unwrap_err();
            assert!(
                matches!(err, WireError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_body_is_rejected_before_reading_it() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend_from_slice(&(MAX_BODY as u16 + 1).to_be_bytes());
        let err = Request::read(&mut bytes.as_slice()).await.unwrap_err();
        assert!(matches!(err, WireError::TooLong(n) if n == MAX_BODY + 1));
    }

    #[tokio::test]
    async fn garbage_and_wrong_version_are_rejected() {
        let err = Request::read(&mut &b"GET / HTTP/1.1\r\n"[..])
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::BadMagic));
        let mut bytes = sample().encode();
        bytes[4] = 9;
        assert!(matches!(
            Request::read(&mut bytes.as_slice()).await.unwrap_err(),
            WireError::Version(9)
        ));
    }

    #[test]
    fn trailing_bytes_and_bad_family_are_malformed() {
        let bytes = sample().encode();
        let mut body = bytes[7..].to_vec();
        body.push(0);
        assert!(matches!(
            Request::decode_body(&body),
            Err(WireError::Malformed(_))
        ));
        let mut body = bytes[7..].to_vec();
        body[0] = 5;
        assert!(matches!(
            Request::decode_body(&body),
            Err(WireError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn response_round_trips_and_rejects_unknown_status() {
        let resp = Response::new(Status::Denied, "denied by rule x")
            .with_code(Code::Policy)
            .with_proof(Proof::Unsigned(crate::identity::Identity {
                spiffe: "spiffe://td/enforcer/b/workload/api".into(),
                labels: tessera_policy::Labels::new([("app", "api")]),
            }));
        let got = Response::read(&mut resp.encode().as_slice()).await.unwrap();
        assert_eq!(got, resp);
        let err = Response::read(&mut &[VERSION, 200, 0, 0, 0, 0, 0][..])
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::UnknownStatus(200)));
    }

    #[test]
    fn long_workload_names_are_cut_on_a_char_boundary() {
        let mut req = sample();
        req.source.workload = "é".repeat(200);
        let bytes = req.encode();
        let got = Request::decode_body(&bytes[7..]).unwrap();
        assert_eq!(got.source.workload.chars().count(), 127);
    }
}
