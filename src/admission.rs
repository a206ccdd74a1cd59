//! Who may start a handshake at all, before any credential is looked at: the client's IP (the
//! TCP peer, or `X-Forwarded-For` from a trusted proxy), a per-IP handshake rate and the node's
//! WebSocket connection cap.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

/// The client's IP. The TCP peer, unless the peer is a trusted proxy: then the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy (entries further left were written
/// by the client and can say anything). A header from an untrusted peer is ignored.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The rate-limit key of an address: an IPv4 address itself, an IPv6 address's /64 (one host
/// usually holds a whole /64, and rotating through it must not buy fresh buckets or memory).
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Handshakes per second per client IP (per /64 for IPv6), with a burst of the same size.
/// Memory stays bounded:
/// [`HandshakeLimiter::forget_idle`] drops every IP whose bucket is full again, so only the IPs
/// seen within about a second are held.
pub struct HandshakeLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl HandshakeLimiter {
    /// `per_second == 0` disables the limit.
    pub fn new(per_second: u32) -> HandshakeLimiter {
        HandshakeLimiter {
            limiter: NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n))),
        }
    }

    /// Whether this IP may start one more handshake now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|l| l.check_key(&bucket(ip)).is_ok())
    }

    /// Drops the IPs whose state equals a fresh one; called periodically.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// IPs currently held.
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The node's WebSocket connection cap (`--max-connections`, 0 = unlimited).
pub struct ConnectionSlots {
    max: usize,
    taken: Arc<AtomicUsize>,
}

/// One taken slot; dropping it frees the slot (when the handshake fails or the session ends).
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionSlots {
    pub fn new(max: usize) -> ConnectionSlots {
        ConnectionSlots {
            max,
            taken: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A slot, or `None` when the node is full.
    pub fn take(&self) -> Option<Slot> {
        let before = self.taken.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.taken.clone());
        (self.max == 0 || before < self.max).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.9, 10.1.2.3"),
        );
        // From a trusted proxy: the right-most untrusted hop.
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        // From anyone else: the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
        // No header, or garbage: the peer.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn slots_are_capped_and_freed() {
        let slots = ConnectionSlots::new(2);
        let a = slots.take().expect("first");
        let _b = slots.take().expect("second");
        assert!(slots.take().is_none());
        drop(a);
        assert!(slots.take().is_some());
        assert!(ConnectionSlots::new(0).take().is_some());
    }

    #[test]
    fn the_rate_is_per_ip_with_a_burst() {
        let l = HandshakeLimiter::new(3);
        for _ in 0..3 {
            assert!(l.allow(ip("192.0.2.1")));
        }
        assert!(!l.allow(ip("192.0.2.1")));
        assert!(l.allow(ip("192.0.2.2")));
        assert!(HandshakeLimiter::new(0).allow(ip("192.0.2.1")));
        // One IPv6 /64 is one bucket.
        let l = HandshakeLimiter::new(1);
        assert!(l.allow(ip("2001:db8:1:2::1")));
        assert!(!l.allow(ip("2001:db8:1:2:ffff::9")));
        assert!(l.allow(ip("2001:db8:1:3::1")));
    }
}
