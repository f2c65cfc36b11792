//! The session table. A challenge costs its caller nothing (anyone may call
//! `/auth`), so open challenges are bounded per peer address and in total;
//! when a bound is reached, the oldest challenge of the peer holding the
//! most is dropped. A flood from one address evicts its own challenges,
//! not other guests'. Attested sessions exist only after verified evidence.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use crate::{Session, SessionState};

/// Open challenges one peer address may hold (guests behind one NAT share
/// an address: this is far above what a host's pods need at once).
pub const MAX_CHALLENGES_PER_PEER: usize = 4096;
/// Open challenges in total (memory bound).
pub const MAX_CHALLENGES: usize = 100_000;
/// Attested sessions in total.
pub const MAX_ATTESTED: usize = 100_000;

/// The address challenges are counted under: IPv4 addresses as they are,
/// IPv6 by /64 (one host usually holds a whole /64).
pub fn peer_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
        },
        v4 => v4,
    }
}

#[derive(Default)]
pub(crate) struct SessionTable {
    sessions: HashMap<String, Session>,
    /// Open challenges per peer, oldest first.
    challenges: HashMap<IpAddr, VecDeque<String>>,
    open_challenges: usize,
    /// When a full table was last purged of expired sessions: a flood keeps
    /// it full, and a purge per request would scan it under the lock each
    /// time.
    last_full_purge: Option<Instant>,
}

/// The attested-session bound was reached (only after purging expired ones).
#[derive(Debug)]
pub(crate) struct Full;

impl SessionTable {
    pub fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// Adds a challenge of `peer`, dropping older challenges if a bound is
    /// reached; returns how many were dropped.
    pub fn insert_challenge(&mut self, id: String, session: Session, peer: IpAddr) -> usize {
        let mut dropped = 0;
        if self
            .challenges
            .get(&peer)
            .is_some_and(|q| q.len() >= MAX_CHALLENGES_PER_PEER)
        {
            dropped += usize::from(self.drop_oldest_of(peer));
        }
        if self.open_challenges >= MAX_CHALLENGES {
            let now = Instant::now();
            if self
                .last_full_purge
                .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
            {
                self.last_full_purge = Some(now);
                self.purge_expired(now);
            }
        }
        if self.open_challenges >= MAX_CHALLENGES {
            let busiest = self
                .challenges
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(peer, _)| *peer);
            if let Some(busiest) = busiest {
                dropped += usize::from(self.drop_oldest_of(busiest));
            }
        }
        // A random id never repeats; if it did, the old entry goes first.
        self.take(&id);
        self.challenges
            .entry(peer)
            .or_default()
            .push_back(id.clone());
        self.open_challenges += 1;
        self.sessions.insert(id, session);
        dropped
    }

    /// Adds (or replaces with) an attested session.
    pub fn insert_attested(&mut self, id: String, session: Session) -> Result<(), Full> {
        self.take(&id);
        if self.sessions.len() - self.open_challenges >= MAX_ATTESTED {
            self.purge_expired(Instant::now());
            if self.sessions.len() - self.open_challenges >= MAX_ATTESTED {
                return Err(Full);
            }
        }
        self.sessions.insert(id, session);
        Ok(())
    }

    /// Removes and returns a session.
    pub fn take(&mut self, id: &str) -> Option<Session> {
        let session = self.sessions.remove(id)?;
        if let SessionState::Challenged { peer, .. } = &session.state {
            self.forget_challenge(*peer, id);
        }
        Some(session)
    }

    pub fn purge_expired(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.take(&id);
        }
    }

    fn drop_oldest_of(&mut self, peer: IpAddr) -> bool {
        let Some(oldest) = self.challenges.get(&peer).and_then(|q| q.front()).cloned() else {
            return false;
        };
        self.take(&oldest).is_some()
    }

    fn forget_challenge(&mut self, peer: IpAddr, id: &str) {
        if let Some(q) = self.challenges.get_mut(&peer) {
            if let Some(pos) = q.iter().position(|x| x == id) {
                q.remove(pos);
                self.open_challenges -= 1;
            }
            if q.is_empty() {
                self.challenges.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn challenge(peer: IpAddr, ttl: Duration) -> Session {
        Session {
            state: SessionState::Challenged {
                nonce: "n".into(),
                tee: kbs_types::Tee::Sample,
                hash: kbs_types::HashAlgorithm::Sha384,
                peer,
            },
            expires: Instant::now() + ttl,
        }
    }

    #[test]
    fn a_flooding_peer_evicts_only_its_own_challenges() {
        let guest: IpAddr = "192.0.2.1".parse().unwrap();
        let flooder: IpAddr = "198.51.100.7".parse().unwrap();
        let ttl = Duration::from_secs(300);
        let mut table = SessionTable::default();
        table.insert_challenge("guest".into(), challenge(guest, ttl), guest);
        let mut dropped = 0;
        for i in 0..MAX_CHALLENGES_PER_PEER + 100 {
            dropped += table.insert_challenge(format!("f{i}"), challenge(flooder, ttl), flooder);
        }
        assert_eq!(dropped, 100);
        assert!(
            table.get("guest").is_some(),
            "the guest's challenge survived"
        );
        assert!(table.get("f0").is_none(), "the flooder's oldest went first");
        assert!(table
            .get(&format!("f{}", MAX_CHALLENGES_PER_PEER + 99))
            .is_some());
        assert_eq!(table.open_challenges, MAX_CHALLENGES_PER_PEER + 1);

        // A used challenge no longer counts.
        assert!(table.take("guest").is_some());
        assert_eq!(table.open_challenges, MAX_CHALLENGES_PER_PEER);
        assert!(!table.challenges.contains_key(&guest));
    }

    #[test]
    fn ipv6_peers_count_by_slash_64() {
        let a = peer_of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = peer_of("2001:db8:1:2:bbbb::7".parse().unwrap());
        let c = peer_of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = peer_of("::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(mapped, "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_total_bound_evicts_from_the_busiest_peer() {
        let ttl = Duration::from_secs(300);
        let mut table = SessionTable::default();
        let quiet: IpAddr = "192.0.2.1".parse().unwrap();
        table.insert_challenge("quiet".into(), challenge(quiet, ttl), quiet);
        // Many flooding addresses (an IPv6 /64 has plenty).
        let mut n = 1;
        while table.open_challenges < MAX_CHALLENGES {
            let peer = IpAddr::from([
                0x20,
                1,
                0xd,
                0xb8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                (n % 100) as u8,
            ]);
            table.insert_challenge(format!("x{n}"), challenge(peer, ttl), peer);
            n += 1;
        }
        let dropped = table.insert_challenge("late".into(), challenge(quiet, ttl), quiet);
        assert_eq!(dropped, 1);
        assert_eq!(table.open_challenges, MAX_CHALLENGES);
        assert!(table.get("quiet").is_some() && table.get("late").is_some());
    }

    #[test]
    fn expired_challenges_are_purged_and_uncounted() {
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let mut table = SessionTable::default();
        table.insert_challenge("old".into(), challenge(peer, Duration::ZERO), peer);
        table.insert_challenge("new".into(), challenge(peer, Duration::from_secs(60)), peer);
        table.purge_expired(Instant::now());
        assert!(table.get("old").is_none() && table.get("new").is_some());
        assert_eq!(table.open_challenges, 1);
        assert_eq!(table.sessions.len(), 1);
    }
}
