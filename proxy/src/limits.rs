//! Bounds on what unauthenticated traffic can make the enforcer keep or do (issue 12 item
//! 4: floods must not grow state without bound).
//!
//! * [`Limit`] / [`Drops`]: the closed set of bounded things and how often each bound was
//!   hit (exported as `tessera_limit_drops_total{limit=...}`): a bound that drops silently
//!   would hide a flood.
//! * [`RateLimiter`]: a token bucket per source prefix (IPv4 /24, IPv6 /64) in front of
//!   expensive work (signature verification, TLS handshakes); its table of buckets is itself
//!   bounded.
//! * [`prefix`]: the source prefix unauthenticated refusals and rate limits are keyed by, so
//!   no key holds an ephemeral port and one host cannot multiply keys by its address.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

macro_rules! limits {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal;)*) => {
        /// One bound on state or work. The metric's label set is exactly these names.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Limit {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Limit {
            pub const ALL: &'static [Limit] = &[$(Limit::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Limit::$variant => $name,)*
                }
            }
        }
    };
}

limits! {
    /// Refusal keys of an interval past the bound: folded into the overflow key.
    RefusalKeys => "refusal-keys";
    /// Refusals folded into an interval's summary record (counted there, not written alone).
    RefusalsAggregated => "refusals-aggregated";
    /// Policy subjects not interned (the interner is full): decided without the cache.
    Interner => "interner";
    /// Unauthenticated sources past the map's bound: counted under one `other` node.
    MapSources => "map-sources";
    /// Verified identities evicted from the warm-token cache (it is full).
    WarmIdentities => "warm-identities";
    /// SYNs refused because the table of pending handshakes is full.
    PendingHandshakes => "pending-handshakes";
    /// Tunnel connections refused because the TLS handshakes in progress are at the bound.
    TlsHandshakes => "tls-handshakes";
    /// Work refused by a source prefix's rate limit (signature checks, TLS handshakes).
    RateLimited => "rate-limited";
    /// Rate-limit buckets past the bound: sources share one overflow bucket.
    RateBuckets => "rate-buckets";
}

/// How often each bound was hit. Shared by the parts that enforce them; read at scrape time.
#[derive(Default)]
pub struct Drops {
    counts: [AtomicU64; Limit::ALL.len()],
}

impl Drops {
    pub fn hit(&self, limit: Limit) {
        self.add(limit, 1);
    }

    pub fn add(&self, limit: Limit, n: u64) {
        self.counts[limit as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, limit: Limit) -> u64 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }

    /// Every bound with its count, in [`Limit::ALL`] order.
    pub fn all(&self) -> Vec<(Limit, u64)> {
        Limit::ALL.iter().map(|&l| (l, self.get(l))).collect()
    }
}

/// The prefix a source address is keyed by: IPv4 /24, IPv6 /64 (an IPv4-mapped address as
/// IPv4). Returns the network address and the prefix length.
pub fn prefix(ip: IpAddr) -> (IpAddr, u8) {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (IpAddr::from([o[0], o[1], o[2], 0]), 24)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                (IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0]), 64)
            }
        },
    }
}

/// `prefix` as text: `203.0.113.0/24`, `fd77::/64`.
pub fn prefix_name(ip: IpAddr) -> String {
    let (net, len) = prefix(ip);
    format!("{net}/{len}")
}

struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// A token bucket per source prefix: `rate` per second, up to `burst` at once. At most
/// `max_buckets` prefixes have a bucket of their own; past that (a flood from many
/// prefixes) new prefixes share one overflow bucket, so the table is bounded and the
/// flood as a whole gets no more than one prefix's rate. Full buckets are forgotten when
/// the table fills (they hold nothing a new bucket would not).
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_buckets: usize,
    buckets: Mutex<(HashMap<IpAddr, Bucket>, Bucket)>,
}

impl RateLimiter {
    pub fn new(rate_per_s: u32, burst: u32, max_buckets: usize) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate_per_s),
            burst,
            max_buckets,
            buckets: Mutex::new((
                HashMap::new(),
                Bucket {
                    tokens: burst,
                    at_ms: 0,
                },
            )),
        }
    }

    /// Whether `src` may do one more unit of work now (and takes a token if so); a refusal
    /// and a shared overflow bucket are counted in `drops`.
    pub fn allow(&self, src: IpAddr, now_ms: u64, drops: &Drops) -> bool {
        let (net, _) = prefix(src);
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (table, overflow) = &mut *guard;
        if !table.contains_key(&net) && table.len() >= self.max_buckets {
            // Buckets that refilled completely are as good as new ones: forget them.
            let (rate, burst) = (self.rate, self.burst);
            table.retain(|_, b| refill(b, rate, burst, now_ms) < burst);
        }
        let bucket = if table.contains_key(&net) || table.len() < self.max_buckets {
            table.entry(net).or_insert(Bucket {
                tokens: self.burst,
                at_ms: now_ms,
            })
        } else {
            drops.hit(Limit::RateBuckets);
            overflow
        };
        let tokens = refill(bucket, self.rate, self.burst, now_ms);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            true
        } else {
            drops.hit(Limit::RateLimited);
            false
        }
    }

    pub fn buckets(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .len()
    }
}

/// Refills `b` to `now_ms`; returns its tokens.
fn refill(b: &mut Bucket, rate: f64, burst: f64, now_ms: u64) -> f64 {
    let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
    b.tokens = (b.tokens + elapsed * rate).min(burst);
    b.at_ms = b.at_ms.max(now_ms);
    b.tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_drop_the_host_part() {
        let p = |s: &str| prefix_name(s.parse().unwrap());
        assert_eq!(p("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(p("::ffff:203.0.113.77"), "203.0.113.0/24");
        assert_eq!(p("fd77:1:2:3:4:5:6:7"), "fd77:1:2:3::/64");
    }

    #[test]
    fn a_prefix_gets_its_burst_then_its_rate_and_the_table_is_bounded() {
        let drops = Drops::default();
        let r = RateLimiter::new(10, 5, 4);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a2: IpAddr = "10.0.0.200".parse().unwrap();
        let allowed = (0..20).filter(|_| r.allow(a, 1_000, &drops)).count();
        assert_eq!(allowed, 5, "the burst, then nothing at the same instant");
        assert!(!r.allow(a2, 1_000, &drops), "same /24, same bucket");
        // 10 per second: after 500 ms, 5 more.
        let later = (0..20).filter(|_| r.allow(a, 1_500, &drops)).count();
        assert_eq!(later, 5);
        assert_eq!(drops.get(Limit::RateLimited), 15 + 1 + 15);
        // Many prefixes: at most 4 buckets, the rest share one.
        let mut ok = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::from([20, (i >> 8) as u8, i as u8, 1]);
            ok += usize::from(r.allow(ip, 1_500, &drops));
        }
        assert!(r.buckets() <= 4, "{} buckets", r.buckets());
        assert!(ok <= 3 * 5 + 5, "{ok} allowed from 1000 prefixes");
        assert!(drops.get(Limit::RateBuckets) > 900);
    }
}
