//! What a run measures: each figure a scenario records and a report shows.

/// Something measured in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Connected,
    ConnectSecs,
    Expected,
    Delivered,
    Lost,
    Duplicated,
    OutOfOrder,
    Garbled,
    Extra,
    Echoed,
    ClientsCut,
    ReadGap,
    CutReadGap,
    LoadStall,
    DeliveriesPerSec,
    LinesPerWrite,
    BytesPerDelivery,
    P50,
    P99,
    P999,
    Max,
    CpuSecs,
    CpuPerDelivery,
    RssIdle,
    RssLoaded,
    RssPerConn,
    RssEnd,
    RssPeak,
    StalledCut,
    StalledGot,
    ServerThreads,
}

impl Metric {
    pub const ALL: [Metric; 31] = [
        Metric::Connected,
        Metric::ConnectSecs,
        Metric::Expected,
        Metric::Delivered,
        Metric::Lost,
        Metric::Duplicated,
        Metric::OutOfOrder,
        Metric::Garbled,
        Metric::Extra,
        Metric::Echoed,
        Metric::ClientsCut,
        Metric::ReadGap,
        Metric::CutReadGap,
        Metric::LoadStall,
        Metric::DeliveriesPerSec,
        Metric::LinesPerWrite,
        Metric::BytesPerDelivery,
        Metric::P50,
        Metric::P99,
        Metric::P999,
        Metric::Max,
        Metric::CpuSecs,
        Metric::CpuPerDelivery,
        Metric::RssIdle,
        Metric::RssLoaded,
        Metric::RssPerConn,
        Metric::RssEnd,
        Metric::RssPeak,
        Metric::StalledCut,
        Metric::StalledGot,
        Metric::ServerThreads,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Connected => "clients registered",
            Metric::ConnectSecs => "connect + register (s)",
            Metric::Expected => "deliveries expected",
            Metric::Delivered => "deliveries (unique)",
            Metric::Lost => "lost",
            Metric::Duplicated => "duplicated",
            Metric::OutOfOrder => "out of order",
            Metric::Garbled => "garbled lines",
            Metric::Extra => "extra lines (other room, never sent)",
            Metric::Echoed => "echoed to sender",
            Metric::ClientsCut => "reading clients cut",
            Metric::ReadGap => "longest gap between a reader's reads (ms)",
            Metric::CutReadGap => "longest gap of a reader that was cut (ms)",
            Metric::LoadStall => "load generator's longest stall (ms)",
            Metric::DeliveriesPerSec => "deliveries/s (whole, in order)",
            Metric::LinesPerWrite => "lines per sender write",
            Metric::BytesPerDelivery => "bytes on the wire per delivery",
            Metric::P50 => "latency p50 (ms)",
            Metric::P99 => "latency p99 (ms)",
            Metric::P999 => "latency p99.9 (ms)",
            Metric::Max => "latency max (ms)",
            Metric::CpuSecs => "server CPU, send phase (s)",
            Metric::CpuPerDelivery => "server CPU ns/delivery",
            Metric::RssIdle => "server RSS idle (MiB)",
            Metric::RssLoaded => "server RSS connected (MiB)",
            Metric::RssPerConn => "server RSS per conn (KiB)",
            Metric::RssEnd => "server RSS at end (MiB)",
            Metric::RssPeak => "server peak RSS (MiB)",
            Metric::StalledCut => "stalled client cut off (1=yes)",
            Metric::StalledGot => "stalled client got lines",
            Metric::ServerThreads => "server threads",
        }
    }

    /// Whether a chatd/peer ratio means something for this metric.
    pub fn has_ratio(self) -> bool {
        matches!(
            self,
            Metric::ConnectSecs
                | Metric::DeliveriesPerSec
                | Metric::P50
                | Metric::P99
                | Metric::P999
                | Metric::Max
                | Metric::CpuSecs
                | Metric::CpuPerDelivery
                | Metric::BytesPerDelivery
                | Metric::RssLoaded
                | Metric::RssPerConn
                | Metric::RssPeak
        )
    }

    pub fn format(self, v: f64) -> String {
        match self {
            Metric::P50
            | Metric::P99
            | Metric::P999
            | Metric::Max
            | Metric::ReadGap
            | Metric::CutReadGap
            | Metric::LoadStall
                if v < 10.0 =>
            {
                format!("{v:.3}")
            }
            Metric::ConnectSecs | Metric::CpuSecs => format!("{v:.2}"),
            Metric::LinesPerWrite | Metric::BytesPerDelivery => format!("{v:.1}"),
            Metric::RssIdle
            | Metric::RssLoaded
            | Metric::RssEnd
            | Metric::RssPeak
            | Metric::RssPerConn => format!("{v:.1}"),
            _ => format!("{v:.0}"),
        }
    }
}
