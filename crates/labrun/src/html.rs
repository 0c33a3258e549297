//! The campaign's report as one self-contained HTML page: tables and inline SVG plots, no
//! scripts, no external files, so that it opens anywhere and can be mailed or archived as is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::campaign::CampaignReport;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.1} %", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.0} ms"))
}

/// Colour of an outcome.
fn colour(outcome: &str) -> &'static str {
    match outcome {
        "SUCCESS" => "#2e7d32",
        "CONNECTION_REVERSED" => "#66bb6a",
        "FAILED" => "#c62828",
        "NO_STREAM" => "#ef6c00",
        "NO_CONNECTION" => "#6d4c41",
        "CANCELLED" => "#757575",
        _ => "#9e9e9e",
    }
}

/// Horizontal bars of the outcome mix.
fn outcome_bars(outcomes: &BTreeMap<String, u64>) -> String {
    let total: u64 = outcomes.values().sum();
    let (w, bar, gap, label) = (640.0, 22.0, 8.0, 190.0);
    let h = (bar + gap) * outcomes.len().max(1) as f64 + gap;
    let mut svg = format!(
        r#"<svg id="outcomes" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="outcome mix">"#
    );
    for (i, (o, n)) in outcomes.iter().enumerate() {
        let y = gap + i as f64 * (bar + gap);
        let len = if total == 0 {
            0.0
        } else {
            (w - label - 90.0) * (*n as f64) / total as f64
        };
        let _ = write!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end" font-size="13">{o}</text><rect x="{label}" y="{y}" width="{len:.1}" height="{bar}" fill="{c}"/><text x="{nx:.1}" y="{ty}" font-size="13">{n} ({p:.1} %)</text>"#,
            tx = label - 8.0,
            ty = y + bar * 0.7,
            o = esc(o),
            c = colour(o),
            nx = label + len + 6.0,
            p = if total == 0 {
                0.0
            } else {
                *n as f64 * 100.0 / total as f64
            },
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The NAT-pair matrix of one transport as a heat map: success rate per cell.
fn heatmap(r: &CampaignReport, transport: &str) -> String {
    let cells: Vec<_> = r
        .matrix
        .iter()
        .filter(|c| c.transport == transport)
        .collect();
    let clients: BTreeSet<&str> = cells.iter().map(|c| c.client_nat.as_str()).collect();
    let targets: BTreeSet<&str> = cells.iter().map(|c| c.target_nat.as_str()).collect();
    let (cw, ch, left, top) = (110.0, 40.0, 140.0, 50.0);
    let w = left + cw * targets.len() as f64 + 10.0;
    let h = top + ch * clients.len() as f64 + 10.0;
    let mut svg = format!(
        r#"<svg class="heatmap" data-transport="{t}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="success by NAT pair over {t}">"#,
        t = esc(transport)
    );
    let _ = write!(
        svg,
        r#"<text x="{x}" y="16" font-size="12" text-anchor="middle">target NAT →</text><text x="8" y="{y}" font-size="12">client NAT ↓</text>"#,
        x = left + cw * targets.len() as f64 / 2.0,
        y = top - 8.0
    );
    for (j, t) in targets.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}" font-size="12" text-anchor="middle">{t}</text>"#,
            x = left + cw * (j as f64 + 0.5),
            y = top - 14.0,
            t = esc(t)
        );
    }
    for (i, c) in clients.iter().enumerate() {
        let y = top + ch * i as f64;
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{ty}" font-size="12" text-anchor="end">{c}</text>"#,
            x = left - 8.0,
            ty = y + ch * 0.6,
            c = esc(c)
        );
        for (j, t) in targets.iter().enumerate() {
            let x = left + cw * j as f64;
            let cell = cells
                .iter()
                .find(|k| k.client_nat == *c && k.target_nat == *t);
            let (fill, text) = match cell {
                Some(k) if k.trials > 0 => {
                    let rate = k.success as f64 / k.trials as f64;
                    // Red (0) to green (1).
                    let red = (200.0 * (1.0 - rate)) as u8 + 40;
                    let green = (160.0 * rate) as u8 + 60;
                    (
                        format!("rgb({red},{green},70)"),
                        format!("{}/{}", k.success, k.trials),
                    )
                }
                _ => ("#eeeeee".to_owned(), "–".to_owned()),
            };
            let _ = write!(
                svg,
                r##"<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}" stroke="#ffffff"/><text x="{tx}" y="{ty}" font-size="13" text-anchor="middle" fill="#ffffff">{text}</text>"##,
                w = cw,
                h = ch,
                tx = x + cw / 2.0,
                ty = y + ch * 0.62
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Empirical CDF of the time to direct, one line per transport.
fn cdf(times: &[(String, f64)]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 300.0, 50.0, 40.0, 10.0, 20.0);
    let max = times
        .iter()
        .map(|(_, t)| *t)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let sx = |t: f64| left + (w - left - right) * t / max;
    let sy = |p: f64| top + (h - top - bottom) * (1.0 - p);
    let mut svg = format!(
        r#"<svg id="cdf" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="time to direct, cumulative">"#
    );
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="#000000"/><line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="#000000"/>"##,
        b = h - bottom,
        r = w - right
    );
    for k in 0..=4 {
        let t = max * f64::from(k) / 4.0;
        let p = f64::from(k) / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}" font-size="11" text-anchor="middle">{t:.0}</text><text x="{lx}" y="{py}" font-size="11" text-anchor="end">{p:.2}</text>"#,
            x = sx(t),
            y = h - bottom + 16.0,
            lx = left - 6.0,
            py = sy(p) + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{x}" y="{y}" font-size="12" text-anchor="middle">time to direct (ms)</text>"#,
        x = left + (w - left - right) / 2.0,
        y = h - 6.0
    );
    let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (t, v) in times {
        by.entry(t.as_str()).or_default().push(*v);
    }
    let colours = ["#1565c0", "#ad1457", "#00897b", "#f9a825"];
    for (i, (transport, mut v)) in by.into_iter().enumerate() {
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let c = colours[i % colours.len()];
        let mut points = format!("{:.1},{:.1}", sx(0.0), sy(0.0));
        for (k, t) in v.iter().enumerate() {
            let _ = write!(
                points,
                " {:.1},{:.1} {:.1},{:.1}",
                sx(*t),
                sy(k as f64 / n),
                sx(*t),
                sy((k + 1) as f64 / n)
            );
        }
        let _ = write!(
            svg,
            r#"<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2"/><text x="{x}" y="{y}" font-size="12" fill="{c}">{t} (n={n})</text>"#,
            x = w - right - 110.0,
            y = sy(0.1) + 16.0 * i as f64,
            t = esc(transport)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The report page.
pub fn campaign_page(r: &CampaignReport, command: &str) -> String {
    let mut html = String::from(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>natpunch lab campaign</title><style>body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4;padding:.1em .3em}</style></head><body>"#,
    );
    let _ = write!(
        html,
        "<h1>natpunch lab campaign</h1><p><code>{}</code></p>",
        esc(command)
    );
    let _ = write!(
        html,
        "<table id=\"summary\"><tr><th>punches</th><td>{}</td></tr><tr><th>stored in the database</th><td>{}</td></tr><tr><th>success rate (SUCCESS / (SUCCESS + FAILED))</th><td>{}</td></tr><tr><th>end-to-end rate (SUCCESS / all)</th><td>{}</td></tr><tr><th>time to direct, median / p95</th><td>{} / {}</td></tr><tr><th>targets recorded by the honeypot</th><td>{} of {}</td></tr><tr><th>database</th><td>{}</td></tr><tr><th>duration</th><td>{:.0} s{}</td></tr></table>",
        r.punches,
        r.stored,
        pct(r.success_rate),
        pct(r.end_to_end_rate),
        ms(r.median_ms),
        ms(r.p95_ms),
        r.targets_recorded,
        r.targets,
        esc(&r.database),
        r.seconds,
        if r.interrupted { " (interrupted)" } else { "" }
    );
    if !r.measured_nat.is_empty() {
        html.push_str("<h2>The clients' NATs, as they measured them</h2><table id=\"nats\"><tr><th>client</th><th>mapping/filtering (RFC 4787, measured with RFC 5780)</th></tr>");
        for (name, m) in &r.measured_nat {
            let _ = write!(html, "<tr><td>{}</td><td>{}</td></tr>", esc(name), esc(m));
        }
        html.push_str("</table>");
    }
    if !r.remote_nat.is_empty() {
        html.push_str("<h2>The targets' NATs, as the relay and the honeypot saw them</h2><p>The same port to both: endpoint-independent mapping; another port: endpoint-dependent. <code>unknown</code>: only one of them saw the target.</p><table id=\"remote-nats\"><tr><th>target</th><th>seen as</th><th>reports</th><th>expected from the preset</th><th>verdict</th></tr>");
        for t in &r.remote_nat {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&t.target),
                esc(&t.observed),
                t.reports,
                esc(&t.expected),
                t.verdict
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Outcomes</h2>");
    html.push_str(&outcome_bars(&r.outcomes));
    let transports: BTreeSet<&str> = r.matrix.iter().map(|c| c.transport.as_str()).collect();
    html.push_str(
        "<h2>Success by NAT pair</h2><p>Successes / punches, client's NAT by the target's.</p>",
    );
    for t in transports {
        let _ = write!(html, "<h3>{}</h3>", esc(t));
        html.push_str(&heatmap(r, t));
    }
    html.push_str("<h2>Time to a direct connection</h2><p>From the relayed connection to the direct one, successful punches.</p>");
    html.push_str(&cdf(&r.times_ms));
    html.push_str("<h2>Every cell</h2><table id=\"matrix\"><tr><th>client NAT</th><th>target NAT</th><th>target seen as</th><th>transport</th><th>punches</th><th>success</th><th>median ms</th><th>outcomes</th></tr>");
    for c in &r.matrix {
        let outcomes: Vec<String> = c.outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.client_nat),
            esc(&c.target_nat),
            esc(&c.remote_nat),
            esc(&c.transport),
            c.trials,
            c.success,
            c.median_ms
                .map_or_else(|| "–".into(), |m| format!("{m:.0}")),
            esc(&outcomes.join(", "))
        );
    }
    html.push_str("</table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::CampaignCell;

    #[test]
    fn the_page_has_its_plots_and_escapes_text() {
        let mut outcomes = BTreeMap::new();
        outcomes.insert("SUCCESS".to_owned(), 3);
        outcomes.insert("FAILED".to_owned(), 1);
        let report = CampaignReport {
            punches: 4,
            stored: 4,
            outcomes: outcomes.clone(),
            database: "sqlite://a<b>.db".into(),
            success_rate: Some(0.75),
            end_to_end_rate: Some(0.75),
            median_ms: Some(300.0),
            p95_ms: Some(400.0),
            times_ms: vec![
                ("tcp".into(), 300.0),
                ("quic".into(), 250.0),
                ("tcp".into(), 400.0),
            ],
            measured_nat: BTreeMap::new(),
            remote_nat: vec![crate::campaign::TargetNat {
                target: "symmetric".into(),
                expected: "endpoint-dependent".into(),
                observed: "endpoint-dependent".into(),
                reports: 4,
                verdict: "match",
            }],
            peers: BTreeMap::new(),
            matrix: vec![CampaignCell {
                client_nat: "port-restricted".into(),
                target_nat: "symmetric".into(),
                remote_nat: "endpoint-dependent".into(),
                transport: "tcp".into(),
                trials: 4,
                success: 3,
                outcomes,
                median_ms: Some(300.0),
            }],
            targets_recorded: 2,
            targets: 2,
            seconds: 60.0,
            interrupted: false,
        };
        let page = campaign_page(&report, "natpunch lab campaign --punches 4");
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains(r#"<svg id="outcomes""#) && page.contains(r#"<svg id="cdf""#));
        assert!(page.contains(r#"data-transport="tcp""#));
        assert!(page.contains("3/4"), "the heat map cell");
        assert!(page.contains("a&lt;b&gt;.db"), "text is escaped");
        assert!(
            page.contains("<td>symmetric</td><td>endpoint-dependent</td><td>4</td>"),
            "the target's NAT as seen"
        );
        assert!(!page.contains("<script"), "no scripts");
        assert_eq!(
            page.matches("<polyline").count(),
            2,
            "one CDF line per transport"
        );
    }
}
