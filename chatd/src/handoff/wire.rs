//! The handoff channel's framing: JSON messages over a UNIX stream socket,
//! file descriptors beside them as `SCM_RIGHTS` ancillary data.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON; the
//! descriptors of a frame ride on its first byte. A message with more
//! descriptors than one `sendmsg` may carry ([`FDS_PER_FRAME`]) sends the
//! rest in frames with an empty body, which the receiver reads until it has
//! the count the message announced. Blocking I/O with deadlines set on the
//! socket: the channel is used once, by a thread of its own.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Descriptors per `sendmsg`: below the kernel's `SCM_MAX_FD` (253).
pub const FDS_PER_FRAME: usize = 200;
/// Largest frame accepted: the state of 100,000 clients with their unsent
/// output fits; anything larger is a bug or a stranger.
const MAX_FRAME: usize = 512 * 1024 * 1024;

/// Sends `msg` with `fds` (in order), in as many frames as they need.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut chunks = fds.chunks(FDS_PER_FRAME);
    send_frame(sock, &body, chunks.next().unwrap_or(&[]))?;
    for chunk in chunks {
        send_frame(sock, &[], chunk)?;
    }
    Ok(())
}

/// Receives one message and exactly `fds(&msg)` descriptors after it.
pub fn recv<T: DeserializeOwned>(
    sock: &UnixStream,
    fds: impl Fn(&T) -> usize,
) -> io::Result<(T, Vec<OwnedFd>)> {
    let (body, mut got) = recv_frame(sock)?;
    let msg: T =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let want = fds(&msg);
    while got.len() < want {
        let (body, more) = recv_frame(sock)?;
        if !body.is_empty() || more.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected a frame of descriptors",
            ));
        }
        got.extend(more);
    }
    if got.len() != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} descriptors received, {want} announced", got.len()),
        ));
    }
    Ok((msg, got))
}

fn send_frame(sock: &UnixStream, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let header = len.to_be_bytes();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_FRAME))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("ancillary buffer too small"));
    }
    // The descriptors go with the first byte; the rest of the header and
    // the body follow as plain writes.
    let sent = loop {
        match sendmsg(
            sock,
            &[IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut w = sock;
    w.write_all(&header[sent..])?;
    w.write_all(body)?;
    Ok(())
}

fn recv_frame(sock: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    let mut fds = Vec::new();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_FRAME))];
    while filled < header.len() {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            match recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut header[filled..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(r) => break r,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors were truncated",
            ));
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the handoff channel",
            ));
        }
        filled += got.bytes;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    let mut r = sock;
    r.read_exact(&mut body)?;
    Ok((body, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_carry_their_descriptors_in_order() {
        let (a, b) = UnixStream::pair().expect("pair");
        // More than one frame's worth, each told apart by its inode.
        let files: Vec<std::fs::File> = (0..450)
            .map(|_| tempfile::tempfile().expect("a temporary file"))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        let ((n, text), got) = std::thread::scope(|scope| {
            scope.spawn(|| send(&a, &(fds.len(), "hello".to_string()), &fds).expect("send"));
            recv::<(usize, String)>(&b, |m| m.0).expect("recv")
        });
        assert_eq!((n, text.as_str()), (450, "hello"));
        let inode =
            |f: &std::fs::File| std::os::unix::fs::MetadataExt::ino(&f.metadata().expect("stat"));
        let sent: Vec<u64> = files.iter().map(inode).collect();
        let received: Vec<u64> = got
            .into_iter()
            .map(std::fs::File::from)
            .map(|f| inode(&f))
            .collect();
        assert_eq!(received, sent);
    }
}
