//! Why a connection was refused or failed, as one closed set of short stable codes.
//!
//! Flow records, metrics, the tunnel's answer and the handshake engine all speak these
//! codes; each error type of the data path maps onto them once (`TokenError::code`,
//! `Refusal::code`, ...), so a code is never a free-form string that could drift. The serde
//! and wire form is the kebab-case name (`"bad-signature"`), with the empty string for a
//! clean, allowed connection.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal, $kind:ident;)*) => {
        /// A refusal or failure code. See the module documentation.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            /// Allowed and clean: no code (serialized as the empty string).
            #[default]
            Clean,
            $($(#[doc = $doc])* $variant,)*
        }

        impl Code {
            /// Every code but [`Code::Clean`], in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The stable name ("" for [`Code::Clean`]).
            pub const fn as_str(self) -> &'static str {
                match self {
                    Code::Clean => "",
                    $(Code::$variant => $name,)*
                }
            }

            /// What kind of refusal it is.
            pub const fn kind(self) -> Kind {
                match self {
                    Code::Clean => Kind::Clean,
                    $(Code::$variant => Kind::$kind,)*
                }
            }
        }

        impl FromStr for Code {
            type Err = UnknownCode;
            fn from_str(s: &str) -> Result<Self, UnknownCode> {
                match s {
                    "" => Ok(Code::Clean),
                    $($name => Ok(Code::$variant),)*
                    other => Err(UnknownCode(other.to_owned())),
                }
            }
        }
    };
}

/// The family a code belongs to (metrics count token failures on their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Clean,
    /// Policy decided (or re-decided) against the connection.
    Policy,
    /// The peer's identity proof (token, handshake message or proof) did not verify.
    Token,
    /// The handshake-mode exchange itself failed.
    Handshake,
    /// The connection could not be carried (routing, reachability, transport).
    Transport,
}

codes! {
    /// Denied by policy.
    Policy => "policy", Policy;
    /// A live connection closed because a new policy (or DNS answer) no longer allows it.
    PolicyReload => "policy-reload", Policy;
    /// A direct connection to a protected port, not through an enforcer.
    Unauthenticated => "unauthenticated", Policy;
    Truncated => "truncated", Token;
    Oversized => "oversized", Token;
    Malformed => "malformed", Token;
    UntrustedIssuer => "untrusted-issuer", Token;
    BadSignature => "bad-signature", Token;
    Expired => "expired", Token;
    NotYetValid => "not-yet-valid", Token;
    LifetimeTooLong => "lifetime-too-long", Token;
    WrongDestination => "wrong-destination", Token;
    WrongSession => "wrong-session", Token;
    Replay => "replay", Token;
    UnknownIdentity => "unknown-identity", Token;
    NoToken => "no-token", Token;
    IssuerNotPeer => "issuer-not-peer", Token;
    ForeignIdentity => "foreign-identity", Token;
    /// A claim that contradicts its enforcer's scope (e.g. `site=london` from a Paris one).
    OutOfScope => "out-of-scope", Token;
    /// A tunnel from an enforcer the control plane's directory does not list (revoked,
    /// removed, or never enrolled).
    NotInDirectory => "not-in-directory", Token;
    /// Handshake mode: a proof that does not verify.
    BadProof => "bad-proof", Handshake;
    /// Handshake mode: the client never sent its proof.
    NoProof => "no-proof", Handshake;
    /// Handshake mode: a packet of a handshake this end does not know.
    NoHandshake => "no-handshake", Handshake;
    /// Handshake mode: the peer never answered with a token.
    NoAnswer => "no-answer", Handshake;
    /// The other end refused (its enforcer recorded why).
    PeerRefused => "peer-refused", Handshake;
    /// No enforcer serves the destination (address or port).
    NotServed => "not-served", Transport;
    /// The peer enforcer (or an external destination) could not be reached.
    PeerUnreachable => "peer-unreachable", Transport;
    /// The local workload could not be reached.
    WorkloadUnreachable => "workload-unreachable", Transport;
    /// A tunnel header that does not parse.
    BadHeader => "bad-header", Transport;
    /// The mutual-TLS handshake of a tunnel failed.
    TlsHandshake => "tls-handshake", Transport;
    /// A redirected connection without a capture record.
    NoCapture => "no-capture", Transport;
    /// The connection broke (or its path ended without saying why).
    Broken => "broken", Transport;
    /// The source's prefix was over its rate of expensive work (signature checks, TLS
    /// handshakes).
    RateLimited => "rate-limited", Transport;
    /// A bounded table or the bound on concurrent TLS handshakes was full.
    Overloaded => "overloaded", Transport;
}

impl Code {
    pub fn is_clean(&self) -> bool {
        *self == Code::Clean
    }
}

/// A code name this build does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown refusal code {0:?}")]
pub struct UnknownCode(pub String);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Codes compare with their names (`rec.code == "policy"`), as in flow logs and filters.
impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code:?} named twice");
            assert_eq!(code.as_str().parse::<Code>(), Ok(code));
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), code);
        }
        assert_eq!("".parse::<Code>(), Ok(Code::Clean));
        assert_eq!(
            "nonsense".parse::<Code>(),
            Err(UnknownCode("nonsense".into()))
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(Code::Replay.kind(), Kind::Token);
        assert_eq!(Code::ForeignIdentity.kind(), Kind::Token);
        assert_eq!(Code::PolicyReload.kind(), Kind::Policy);
        assert_eq!(Code::Clean.kind(), Kind::Clean);
    }
}
