//! What each handshake packet carries (after the experimental option), big-endian:
//!
//! ```text
//! SYN      type 1 | client X25519 key [32] | token_len u16 | token
//! SYN-ACK  type 2 | server X25519 key [32] | server proof [16] | token_len u16 | token
//! ACK      type 3 | client proof [16]
//! ```
use thiserror::Error;

use super::proof::{PROOF_LEN, Proof, PublicKey};
use crate::identity::token::MAX_TOKEN;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Syn {
        client_key: PublicKey,
        token: Vec<u8>,
    },
    SynAck {
        server_key: PublicKey,
        proof: Proof,
        token: Vec<u8>,
    },
    Ack {
        proof: Proof,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("truncated handshake message ({0})")]
    Truncated(&'static str),
    #[error("unknown handshake message type {0}")]
    Type(u8),
    #[error("token of {0} bytes is over the limit")]
    TokenTooLarge(usize),
    #[error("trailing bytes after the handshake message")]
    Trailing,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Self::Syn { client_key, token } => {
                out.push(1);
                out.extend_from_slice(client_key);
                out.extend_from_slice(&(token.len() as u16).to_be_bytes());
                out.extend_from_slice(token);
            }
            Self::SynAck {
                server_key,
                proof,
                token,
            } => {
                out.push(2);
                out.extend_from_slice(server_key);
                out.extend_from_slice(proof);
                out.extend_from_slice(&(token.len() as u16).to_be_bytes());
                out.extend_from_slice(token);
            }
            Self::Ack { proof } => {
                out.push(3);
                out.extend_from_slice(proof);
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, MessageError> {
        let mut r = b;
        let mut take = |n: usize, what: &'static str| -> Result<&[u8], MessageError> {
            if r.len() < n {
                return Err(MessageError::Truncated(what));
            }
            let (head, rest) = r.split_at(n);
            r = rest;
            Ok(head)
        };
        let kind = take(1, "type")?[0];
        let msg = match kind {
            1 => {
                let client_key = take(32, "key")?.try_into().expect("32");
                let token = token(&mut take)?;
                Self::Syn { client_key, token }
            }
            2 => {
                let server_key = take(32, "key")?.try_into().expect("32");
                let proof = take(PROOF_LEN, "proof")?.try_into().expect("16");
                let token = token(&mut take)?;
                Self::SynAck {
                    server_key,
                    proof,
                    token,
                }
            }
            3 => Self::Ack {
                proof: take(PROOF_LEN, "proof")?.try_into().expect("16"),
            },
            other => return Err(MessageError::Type(other)),
        };
        if !r.is_empty() {
            return Err(MessageError::Trailing);
        }
        Ok(msg)
    }
}

fn token<'a>(
    take: &mut impl FnMut(usize, &'static str) -> Result<&'a [u8], MessageError>,
) -> Result<Vec<u8>, MessageError> {
    let len = u16::from_be_bytes(take(2, "token length")?.try_into().expect("2")) as usize;
    if len > MAX_TOKEN {
        return Err(MessageError::TokenTooLarge(len));
    }
    Ok(take(len, "token")?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_every_truncation_is_refused() {
        for m in [
            Message::Syn {
                client_key: [1; 32],
                token: vec![9; 197],
            },
            Message::SynAck {
                server_key: [2; 32],
                proof: [3; 16],
                token: vec![8; 157],
            },
            Message::Ack { proof: [4; 16] },
        ] {
            let b = m.encode();
            assert_eq!(Message::decode(&b).unwrap(), m);
            for cut in 0..b.len() {
                assert!(
                    matches!(Message::decode(&b[..cut]), Err(MessageError::Truncated(_))),
                    "cut at {cut}"
                );
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(Message::decode(&long), Err(MessageError::Trailing));
        }
        assert_eq!(Message::decode(&[9]), Err(MessageError::Type(9)));
        let mut huge = vec![1u8];
        huge.extend_from_slice(&[0; 32]);
        huge.extend_from_slice(&5000u16.to_be_bytes());
        assert_eq!(
            Message::decode(&huge),
            Err(MessageError::TokenTooLarge(5000))
        );
    }
}
