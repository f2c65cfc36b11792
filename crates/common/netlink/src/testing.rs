//! For tests against the real kernel (feature `testing`): a private
//! network namespace and veth pairs in it.

use crate::core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use crate::packet::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage};
use crate::{RouteNetlinkMessage, Rtnl};

/// Runs `f` on a thread in a new network namespace (gone when the thread
/// and its sockets are); `None`, said on stderr, where this process may
/// not make one (not root).
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("SKIPPED: cannot make a network namespace here ({e}): run as root");
                return None;
            }
            Some(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Creates the veth pair `name` / `peer_name`.
pub fn veth_pair(rtnl: &mut Rtnl, name: &str, peer_name: &str) -> std::io::Result<()> {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(peer_name.to_string()));
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    rtnl.request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}
