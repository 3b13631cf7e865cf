//! The metrics and the comparison table: one table per scenario, one column
//! per target (median over runs), then chatd/peer ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use crate::metric::Metric;
use crate::scenario::Outcome;
use crate::server::Target;

/// The median of `values` (the lower middle for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[(values.len() - 1) / 2])
}

/// All runs of one scenario, by target.
pub type Runs = BTreeMap<Target, Vec<Outcome>>;

/// Renders one scenario's table.
pub fn table(
    (name, what, conditions): (&str, &str, &str),
    targets: &[Target],
    runs: &Runs,
) -> String {
    let mut medians: BTreeMap<(Target, Metric), f64> = BTreeMap::new();
    let mut counts: BTreeMap<Target, usize> = BTreeMap::new();
    for (&t, outcomes) in runs {
        counts.insert(t, outcomes.len());
        for m in Metric::ALL {
            let mut vs: Vec<f64> = outcomes
                .iter()
                .filter_map(|o| o.values.get(&m).copied())
                .collect();
            if let Some(v) = median(&mut vs) {
                medians.insert((t, m), v);
            }
        }
    }
    let peers: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|&t| t != Target::Chatd)
        .collect();
    let has_chatd = targets.contains(&Target::Chatd);
    let mut header = vec!["metric".to_owned()];
    header.extend(targets.iter().map(|t| t.name().to_owned()));
    if has_chatd {
        header.extend(peers.iter().map(|p| format!("chatd/{}", p.name())));
    }
    let mut rows = vec![header];
    for m in Metric::ALL {
        if !targets.iter().any(|&t| medians.contains_key(&(t, m))) {
            continue;
        }
        let mut row = vec![m.label().to_owned()];
        for &t in targets {
            row.push(
                medians
                    .get(&(t, m))
                    .map_or("-".to_owned(), |&v| m.format(v)),
            );
        }
        if has_chatd {
            for &p in &peers {
                let ratio = match (medians.get(&(Target::Chatd, m)), medians.get(&(p, m))) {
                    (Some(&c), Some(&v)) if m.has_ratio() && v > 0.0 => format!("{:.2}", c / v),
                    _ => String::new(),
                };
                row.push(ratio);
            }
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    let runs_note = counts
        .iter()
        .map(|(t, n)| format!("{} x{n}", t.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(s, "\n== {name}: {what}");
    let _ = writeln!(s, "   (median of runs: {runs_note})");
    let _ = writeln!(s, "   ({conditions})");
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (j, cell) in row.iter().enumerate() {
            if j == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[j]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[j]);
            }
        }
        let _ = writeln!(s, "{}", line.trim_end());
        if i == 0 {
            let _ = writeln!(s, "{}", "-".repeat(line.trim_end().len()));
        }
    }
    for (&t, outcomes) in runs {
        for (i, o) in outcomes.iter().enumerate() {
            for note in &o.notes {
                let _ = writeln!(s, "   note: {} run {}: {note}", t.name(), i + 1);
            }
        }
    }
    s
}
