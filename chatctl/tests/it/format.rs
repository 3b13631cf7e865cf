//! The formatters people read.

use std::time::Duration;

use chatctl::format::{bytes, duration};

#[test]
fn durations_use_their_two_largest_units() {
    let cases = [
        (0, "0s"),
        (59, "59s"),
        (60, "1m00s"),
        (192, "3m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3 * 3600 + 5 * 60 + 7, "3h05m"),
        (86_399, "23h59m"),
        (86_400, "1d00h"),
        (3 * 86_400 + 4 * 3600 + 59, "3d04h"),
        (400 * 86_400, "400d00h"),
    ];
    for (secs, text) in cases {
        assert_eq!(duration(Duration::from_secs(secs)), text, "{secs}s");
    }
    assert_eq!(
        duration(Duration::from_millis(1999)),
        "1s",
        "sub-seconds are cut"
    );
}

#[test]
fn byte_counts() {
    assert_eq!(bytes(0), "0B");
    assert_eq!(bytes(1023), "1023B");
    assert_eq!(bytes(1024), "1.0KiB");
    assert_eq!(bytes(1536), "1.5KiB");
    assert_eq!(bytes(20 * 1024 * 1024), "20.0MiB");
    assert_eq!(bytes(u64::MAX), "16384.0PiB");
}
