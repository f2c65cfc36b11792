//! A synchronous rtnetlink client: one request, its replies, its ACK.
//!
//! Hand-written over netlink-sys and netlink-packet-route (both already in
//! the tree through libcontainer) because rtnetlink, the crate that wraps
//! them, is async; the shim's create path is not.

use std::io;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// A route netlink socket. Its network namespace is the one of the thread
/// that opened it, for as long as it lives.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` with `flags` (besides NLM_F_REQUEST) and returns
    /// the replies: a dump's messages (`NLM_F_DUMP`), or nothing once the
    /// kernel acknowledged (`NLM_F_ACK`). A kernel error is returned as the
    /// errno it carries. A dump the kernel interrupted (the table changed
    /// under it) is run again, a few times.
    pub fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut attempts = 0;
        loop {
            match self.request_once(message.clone(), flags) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        && flags & NLM_F_DUMP == NLM_F_DUMP
                        && attempts < 3 =>
                {
                    attempts += 1;
                }
                done => return done,
            }
        }
    }

    fn request_once(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        let mut replies = Vec::new();
        loop {
            let (datagram, from) = self.socket.recv_from_full()?;
            // Only the kernel (port 0) answers; anything else on this
            // socket is another process's.
            if from.port_number() != 0 {
                continue;
            }
            let mut offset = 0;
            while offset + 16 <= datagram.len() {
                let length = NetlinkBuffer::new_checked(&datagram[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                    .length() as usize;
                if length < 16 || offset + length > datagram.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a netlink message overruns its datagram",
                    ));
                }
                let one = &datagram[offset..offset + length];
                offset += (length + 3) & !3;
                // One message this crate version cannot decode (an
                // attribute it does not know) must not end a dump; said.
                let Ok(reply) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(one) else {
                    log::warn!("netlink: a reply this version cannot decode was skipped");
                    continue;
                };
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                if reply.header.flags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::from_raw_os_error(libc::EINTR));
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }
}
