//! The line framer with telnet stripping, fed the input cut at fuzzer-chosen
//! points. Invariants: no panic; never more than `max_line + 1` bytes
//! buffered; the result does not depend on where the input was cut; a
//! valid input (no byte 255, every line within the limit) comes back line
//! for line, byte for byte.
#![no_main]

use bytes::BytesMut;
use chatd_text::framing::{Frame, LineFramer};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Out {
    Line(Vec<u8>),
    TooLong,
}

/// Frames `chunks` one read at a time, as `Connection` does.
fn run(chunks: &[&[u8]], max_line: usize) -> (Vec<Out>, Vec<u8>) {
    let mut framer = LineFramer::default();
    let mut frames = Vec::new();
    let mut replies = BytesMut::new();
    for chunk in chunks {
        let mut buf = chunk.to_vec();
        let n = framer.strip_telnet(&mut buf, &mut replies);
        framer.feed(&buf[..n], max_line, |frame| {
            frames.push(match frame {
                Frame::Line(line) => Out::Line(line.to_vec()),
                Frame::TooLong => Out::TooLong,
            })
        });
        assert!(
            framer.buffered() <= max_line + 1,
            "{} bytes buffered with a limit of {max_line}",
            framer.buffered()
        );
    }
    (frames, replies.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let [max, cut_count, rest @ ..] = data else {
        return;
    };
    let max_line = 1 + usize::from(*max) % 64;
    let cut_count = usize::from(*cut_count % 8).min(rest.len());
    let (cuts, input) = rest.split_at(cut_count);

    let whole = run(&[input], max_line);

    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (input.len() + 1))
        .collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points {
        chunks.push(&input[start..p]);
        start = p;
    }
    chunks.push(&input[start..]);
    assert_eq!(run(&chunks, max_line), whole, "cut at {chunks:?}");

    // Framing then re-joining loses no byte of a valid line.
    if !input.contains(&255) {
        let mut segments: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        // After the last newline: an incomplete line, reported over-long
        // as soon as it cannot fit any more.
        let tail = segments.pop().unwrap_or_default();
        let expected: Vec<Out> = segments
            .iter()
            .map(|s| s.strip_suffix(b"\r").unwrap_or(s))
            .map(|l| {
                if l.len() > max_line {
                    Out::TooLong
                } else {
                    Out::Line(l.to_vec())
                }
            })
            .collect();
        if tail.len() <= max_line + 1 && expected.iter().all(|o| *o != Out::TooLong) {
            assert_eq!(whole.0, expected);
            assert!(whole.1.is_empty(), "replies to no telnet command");
        }
    }
});
