//! The live dashboard's figures, counted by the database: success over time, the NAT-pair ×
//! transport matrix, outcomes, time to direct, agent versions and reports per second.
//!
//! Each figure is one aggregate query over `hole_punch_results`, so a page costs a few scans
//! whatever the number of viewers (the server keeps an answer for a few seconds) and moves no
//! rows to the server. Values clients choose (their NAT's name, their agent version) are
//! bounded: at most [`MAX_GROUPS`] groups each.

use serde::Serialize;
use sqlx::Row as _;

use super::{SqlStore, StoreError, render};
use crate::stats::wilson95;

/// Most groups a figure keeps (matrix cells, agent versions).
pub const MAX_GROUPS: usize = 200;

/// Upper bounds of the time-to-direct bins, ms; the last bin is everything above.
pub const TIME_BINS_MS: [u32; 7] = [100, 200, 500, 1000, 2000, 5000, 10_000];

/// Buckets of the success-over-time chart, at most.
const MAX_BUCKETS: i64 = 48;

/// Bucket widths the chart picks from, seconds.
const BUCKET_WIDTHS: [i64; 10] = [
    10,
    60,
    300,
    900,
    3600,
    3 * 3600,
    6 * 3600,
    86_400,
    7 * 86_400,
    30 * 86_400,
];

/// Everything the dashboard shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dashboard {
    /// When the figures were counted, Unix seconds.
    pub generated_at: i64,
    /// Reports stored.
    pub results: i64,
    /// Of which outcome `SUCCESS`.
    pub successes: i64,
    /// Their share, with its 95% Wilson interval (`None` without reports).
    pub success_rate: Option<Rate>,
    /// Reports stored in the last minute, per second.
    pub reports_per_sec: f64,
    /// Reports per outcome, most first.
    pub outcomes: Vec<Count>,
    /// Width of a bucket of `over_time`, seconds.
    pub bucket_secs: i64,
    /// Reports and successes per bucket, oldest first.
    pub over_time: Vec<Bucket>,
    /// Client NAT × remote NAT × transport, most reports first.
    pub matrix: Vec<Cell>,
    /// Successful reports by time to direct, in the bins of [`TIME_BINS_MS`] and one above.
    pub time_to_direct: Vec<Count>,
    /// Reporting hosts and their reports per agent version, most reports first.
    pub agents: Vec<Agent>,
}

/// A share with its 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// The share, 0..=1.
    pub value: f64,
    /// Low end of the interval.
    pub low: f64,
    /// High end of the interval.
    pub high: f64,
}

impl Rate {
    /// `successes` of `n`, or `None` when `n` is 0.
    pub fn of(successes: i64, n: i64) -> Option<Self> {
        let (s, n) = (u32::try_from(successes).ok()?, u32::try_from(n).ok()?);
        (n > 0).then(|| {
            let (low, high) = wilson95(s, n);
            Self {
                value: f64::from(s) / f64::from(n),
                low,
                high,
            }
        })
    }
}

/// A named count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Count {
    /// What is counted (an outcome, a bin such as `100-200 ms`).
    pub name: String,
    /// How many.
    pub n: i64,
}

/// One bucket of the success-over-time chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Its start, Unix seconds.
    pub start: i64,
    /// Reports stored in it.
    pub n: i64,
    /// Of which successes.
    pub successes: i64,
}

/// One cell of the NAT-pair × transport matrix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// The client's NAT as it measured it (`unknown` when it did not say).
    pub client_nat: String,
    /// The remote's NAT (`unknown` when not known).
    pub remote_nat: String,
    /// `tcp` or `quic` (the protocol filter), else the direct connection's, else `any`.
    pub transport: String,
    /// Reports.
    pub n: i64,
    /// Of which successes.
    pub successes: i64,
    /// Their share.
    pub rate: Option<Rate>,
}

/// Reporting hosts of one agent version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    /// The agent version (`unknown` when none was registered).
    pub agent_version: String,
    /// Hosts that reported.
    pub hosts: i64,
    /// Their reports.
    pub reports: i64,
}

/// The transport a report's punch used: what its protocol filter allowed (`6` TCP, `460`/`461`
/// QUIC), else the direct connection's, else `any`.
pub fn transport_of(filters: &[i32], transport: Option<&str>) -> String {
    if filters.contains(&6) {
        "tcp".into()
    } else if filters.iter().any(|c| matches!(c, 460 | 461)) {
        "quic".into()
    } else {
        transport.unwrap_or("any").to_owned()
    }
}

/// The name of time-to-direct bin `k` of [`TIME_BINS_MS`].
pub fn bin_name(k: usize) -> String {
    let upper = TIME_BINS_MS.get(k);
    let lower = k.checked_sub(1).and_then(|l| TIME_BINS_MS.get(l));
    match (lower, upper) {
        (None, Some(u)) => format!("< {u} ms"),
        (Some(l), Some(u)) => format!("{l}-{u} ms"),
        (Some(l), None) => format!("≥ {l} ms"),
        (None, None) => String::new(),
    }
}

/// `SUCCESS` as 1, anything else as 0, for `sum`.
const SUCCESS: &str = "CASE WHEN {text outcome} = 'SUCCESS' THEN 1 ELSE 0 END";

impl SqlStore {
    /// The dashboard's figures at `now` (Unix ns).
    pub async fn dashboard(&self, now: i64) -> Result<Dashboard, StoreError> {
        let b = self.backend;
        let q = |sql: &str| render(&sql.replace("{success}", SUCCESS), b);
        let pool = &self.pool;
        let minute_ago = now.saturating_sub(60_000_000_000);
        let row = sqlx::query(&q("SELECT count(*), coalesce(sum({success}), 0), \
             (SELECT count(*) FROM hole_punch_results WHERE created_at > {ts $1}), \
             min({epoch created_at}), max({epoch created_at}) FROM hole_punch_results"))
        .bind(minute_ago)
        .fetch_one(pool)
        .await?;
        let (results, successes, last_minute): (i64, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let (first, last): (Option<i64>, Option<i64>) = (row.try_get(3)?, row.try_get(4)?);

        let mut outcomes = Vec::new();
        for row in sqlx::query(&q(
            "SELECT {text outcome}, count(*) FROM hole_punch_results \
             GROUP BY 1 ORDER BY 2 DESC, 1",
        ))
        .fetch_all(pool)
        .await?
        {
            outcomes.push(Count {
                name: row.try_get(0)?,
                n: row.try_get(1)?,
            });
        }

        let span = last.zip(first).map_or(0, |(l, f)| l - f);
        let bucket_secs = BUCKET_WIDTHS
            .iter()
            .copied()
            .find(|w| span / w < MAX_BUCKETS)
            .unwrap_or(BUCKET_WIDTHS[BUCKET_WIDTHS.len() - 1]);
        let mut over_time = Vec::new();
        for row in sqlx::query(&q("SELECT ({epoch created_at} / $1) * $1 AS b, count(*), \
             sum({success}) FROM hole_punch_results GROUP BY 1 ORDER BY 1"))
        .bind(bucket_secs)
        .fetch_all(pool)
        .await?
        {
            over_time.push(Bucket {
                start: row.try_get(0)?,
                n: row.try_get(1)?,
                successes: row.try_get(2)?,
            });
        }

        let mut cells: std::collections::BTreeMap<(String, String, String), (i64, i64)> =
            std::collections::BTreeMap::new();
        let limit = i64::try_from(MAX_GROUPS).unwrap_or(i64::MAX);
        for row in sqlx::query(&q(
            "SELECT coalesce(client_nat, ''), coalesce(remote_nat, ''), \
             {text protocol_filters}, coalesce(transport, ''), count(*), sum({success}) \
             FROM hole_punch_results GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC LIMIT $1",
        ))
        .bind(limit)
        .fetch_all(pool)
        .await?
        {
            let name = |s: String| if s.is_empty() { "unknown".into() } else { s };
            let filters = super::filter_codes(&row.try_get::<String, _>(2)?);
            let transport: String = row.try_get(3)?;
            let key = (
                name(row.try_get(0)?),
                name(row.try_get(1)?),
                transport_of(&filters, (!transport.is_empty()).then_some(&transport)),
            );
            let cell = cells.entry(key).or_default();
            cell.0 += row.try_get::<i64, _>(4)?;
            cell.1 += row.try_get::<i64, _>(5)?;
        }
        let mut matrix: Vec<Cell> = cells
            .into_iter()
            .map(
                |((client_nat, remote_nat, transport), (n, successes))| Cell {
                    client_nat,
                    remote_nat,
                    transport,
                    n,
                    successes,
                    rate: Rate::of(successes, n),
                },
            )
            .collect();
        matrix.sort_by_key(|c| std::cmp::Reverse(c.n));

        let bins: String = TIME_BINS_MS
            .iter()
            .enumerate()
            .map(|(k, ms)| format!("WHEN t < {} THEN {k} ", f64::from(*ms) / 1000.0))
            .collect();
        let mut time_to_direct: Vec<Count> = (0..=TIME_BINS_MS.len())
            .map(|k| Count {
                name: bin_name(k),
                n: 0,
            })
            .collect();
        let histogram = format!(
            "SELECT CAST(CASE {bins}ELSE {} END AS BIGINT) AS bin, count(*) FROM (SELECT {{secs time_to_direct}} \
             AS t FROM hole_punch_results WHERE {{text outcome}} = 'SUCCESS' \
             AND time_to_direct IS NOT NULL) x GROUP BY 1",
            TIME_BINS_MS.len()
        );
        for row in sqlx::query(&q(&histogram)).fetch_all(pool).await? {
            let bin: i64 = row.try_get(0)?;
            if let Some(c) = usize::try_from(bin)
                .ok()
                .and_then(|k| time_to_direct.get_mut(k))
            {
                c.n = row.try_get(1)?;
            }
        }

        let mut agents = Vec::new();
        for row in sqlx::query(&q("SELECT coalesce(p.agent_version, ''), \
             count(DISTINCT r.local_id), count(*) FROM hole_punch_results r \
             JOIN peers p ON p.id = r.local_id GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT $1"))
        .bind(limit)
        .fetch_all(pool)
        .await?
        {
            let agent: String = row.try_get(0)?;
            agents.push(Agent {
                agent_version: if agent.is_empty() {
                    "unknown".into()
                } else {
                    agent
                },
                hosts: row.try_get(1)?,
                reports: row.try_get(2)?,
            });
        }

        Ok(Dashboard {
            generated_at: now / 1_000_000_000,
            results,
            successes,
            success_rate: Rate::of(successes, results),
            reports_per_sec: last_minute as f64 / 60.0,
            outcomes,
            bucket_secs,
            over_time,
            matrix,
            time_to_direct,
            agents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_come_from_the_filter_first() {
        assert_eq!(transport_of(&[4, 6], None), "tcp");
        assert_eq!(transport_of(&[4, 461], Some("tcp")), "quic");
        assert_eq!(transport_of(&[], Some("quic")), "quic");
        assert_eq!(transport_of(&[], None), "any");
    }

    #[test]
    fn bins_are_named_by_their_bounds() {
        assert_eq!(bin_name(0), "< 100 ms");
        assert_eq!(bin_name(1), "100-200 ms");
        assert_eq!(bin_name(TIME_BINS_MS.len()), "≥ 10000 ms");
    }

    #[test]
    fn a_rate_needs_reports() {
        assert_eq!(Rate::of(0, 0), None);
        let r = Rate::of(5, 10).expect("a rate");
        assert!((r.value - 0.5).abs() < 1e-9 && r.low < 0.5 && r.high > 0.5);
    }
}
