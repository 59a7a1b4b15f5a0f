//! TCP-handshake mode (issue 6), the parts that need no kernel: identity tokens and an
//! X25519 key exchange carried in the SYN, SYN-ACK and third ACK.
//!
//! * [`packet`]: attaching a message to a handshake packet behind an RFC 6994 experimental
//!   option and detaching it, restoring the exact packet (lengths and checksums fixed).
//! * [`proof`]: the ephemeral X25519 exchange, the transcript, the HMAC proofs of the
//!   SYN-ACK and the ACK, and the bindings of the two tokens to the handshake.
//! * [`message`]: what each handshake packet carries.
//! * [`fast`]: the pair secret both ends derive for the in-kernel fast path.
//! * [`engine`]: both ends of the handshake, packet in, verdict and rewritten packet out.
//!
//! The NFQUEUE workers and the iptables rules that feed the engine live in the enforcer.
pub mod engine;
pub mod fast;
pub mod message;
pub mod packet;
pub mod proof;
