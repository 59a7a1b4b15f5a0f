//! The replay window of a tunnel session's tokens (version 3).
//!
//! A session token's nonce is its sender's sequence number on the session. With one
//! connection per tunnel they arrived in order, and "must exceed the last" was the whole
//! check. Streams of a multiplexed tunnel are answered concurrently, so tokens may arrive a
//! little out of order: as IPsec's anti-replay window (RFC 4303, 3.4.3), the receiver keeps
//! the highest number accepted and a bitmap of the [`WINDOW`] numbers below it. A number
//! below the window, or one already marked, is a replay. The state is fixed-size per
//! session, whatever a peer sends.

/// Sequence numbers below the highest accepted that may still arrive (once each).
pub const WINDOW: u128 = 1_024;
const WORDS: usize = (WINDOW / 64) as usize;

/// The sequence numbers accepted on a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The highest number accepted (0: none yet; numbers start at 1).
    top: u128,
    /// Bit `i` set: `top - i` was accepted (bit 0 is `top` itself).
    seen: [u64; WORDS],
}

impl ReplayWindow {
    /// Whether `seq` is new (accepted, and marked) or a replay / too old (refused,
    /// nothing changes).
    pub fn accept(&mut self, seq: u128) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            self.shift(seq - self.top);
            self.top = seq;
            self.seen[0] |= 1;
            return true;
        }
        let back = self.top - seq;
        if back >= WINDOW {
            return false;
        }
        let (word, bit) = ((back / 64) as usize, back % 64);
        if self.seen[word] & (1 << bit) != 0 {
            return false;
        }
        self.seen[word] |= 1 << bit;
        true
    }

    /// The highest number accepted so far.
    pub fn top(&self) -> u128 {
        self.top
    }

    /// Moves every mark `by` positions further back (marks past the window fall off).
    fn shift(&mut self, by: u128) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let hi = from.map_or(0, |f| self.seen[f]);
            let lo = from
                .and_then(|f| f.checked_sub(1))
                .map_or(0, |f| self.seen[f]);
            self.seen[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_out_of_order_replayed_and_too_old() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0), "numbers start at 1");
        assert!(w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "late but within the window");
        assert!(!w.accept(2) && !w.accept(3) && !w.accept(1), "replays");
        assert!(w.accept(3 + WINDOW - 1));
        assert!(!w.accept(3), "marked, and now at the window's edge");
        assert!(!w.accept(2), "below the window");
        assert!(w.accept(4), "unmarked, still within the window");
        assert!(w.accept(u128::MAX));
        assert!(!w.accept(u128::MAX));
        assert!(!w.accept(5));
    }

    proptest! {
        /// Against a model that remembers every number: the window accepts exactly the new
        /// numbers within `WINDOW` of the highest accepted.
        #[test]
        fn matches_a_model_that_remembers_everything(
            seqs in prop::collection::vec(1u128..4_000, 1..600)
        ) {
            let mut w = ReplayWindow::default();
            let mut accepted = std::collections::BTreeSet::new();
            for seq in seqs {
                let top = accepted.last().copied().unwrap_or(0);
                let expect = !accepted.contains(&seq) && (seq > top || top - seq < WINDOW);
                prop_assert_eq!(w.accept(seq), expect, "seq {} top {}", seq, top);
                if expect {
                    accepted.insert(seq);
                }
            }
        }
    }
}
