//! A small SVG writer for `--plot`: histograms of TTFT and ITL, and throughput over time.
//! Plain SVG elements, so the file opens in any browser with no fonts or scripts.

use std::fmt::Write;

use twinfer::bench::serve::ServeReport;

const W: f64 = 360.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;

pub fn serve_svg(r: &ServeReport) -> String {
    let ttft: Vec<f64> = r.requests.iter().filter_map(|(_, m)| m.ttft()).map(|s| s * 1e3).collect();
    let itl: Vec<f64> = r.requests.iter().flat_map(|(_, m)| m.itl()).map(|s| s * 1e3).collect();
    // Every token's absolute time, for throughput over time.
    let mut times: Vec<f64> = r.requests.iter().flat_map(|(t0, m)| m.token_times.iter().map(move |t| t0 + t)).collect();
    times.sort_by(f64::total_cmp);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        3.0 * W,
        H + 30.0
    );
    let _ = write!(
        svg,
        r#"<text x="8" y="16" font-size="13">twinfer bench serve: {} at scale x{} / concurrency x{}: {}</text>"#,
        r.spec.name,
        r.scale,
        r.concurrency_scale,
        escape(&r.model_description)
    );
    histogram(&mut svg, 0.0, "TTFT (ms)", &ttft);
    histogram(&mut svg, W, "inter-token latency (ms)", &itl);
    throughput(&mut svg, 2.0 * W, &times);
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn frame(svg: &mut String, x0: f64, title: &str, x_max: f64, y_max: f64, x_label: &str) {
    let (left, top, bottom, right) = (x0 + PAD, 30.0 + 20.0, 30.0 + H - PAD + 10.0, x0 + W - 10.0);
    let _ = write!(svg, r#"<text x="{}" y="{}">{}</text>"#, left, top - 6.0, escape(title));
    let _ = write!(svg, r#"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>"#);
    let _ = write!(svg, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>"#);
    let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="end">{:.3}</text>"#, right, bottom + 14.0, x_max);
    let _ = write!(svg, r#"<text x="{}" y="{}">0</text>"#, left, bottom + 14.0);
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        bottom + 26.0,
        x_label
    );
    let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, left - 4.0, top + 4.0, y_max);
}

fn histogram(svg: &mut String, x0: f64, title: &str, samples: &[f64]) {
    let bins = 24;
    let max = samples.iter().cloned().fold(0.0, f64::max).max(1e-9);
    let mut counts = vec![0usize; bins];
    for &s in samples {
        counts[((s / max * bins as f64) as usize).min(bins - 1)] += 1;
    }
    let peak = *counts.iter().max().unwrap_or(&1).max(&1);
    frame(svg, x0, &format!("{title}, {} samples", samples.len()), max, peak as f64, "ms");
    let (left, bottom) = (x0 + PAD, 30.0 + H - PAD + 10.0);
    let (width, height) = (W - PAD - 10.0, H - PAD - 30.0);
    for (i, &c) in counts.iter().enumerate() {
        let h = c as f64 / peak as f64 * height;
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7fb5"/>"##,
            left + i as f64 * width / bins as f64,
            bottom - h,
            width / bins as f64 - 1.0,
            h
        );
    }
}

fn throughput(svg: &mut String, x0: f64, times: &[f64]) {
    let end = times.last().copied().unwrap_or(1.0).max(1e-3);
    let bins = 30;
    let dt = end / bins as f64;
    let mut counts = vec![0f64; bins];
    for &t in times {
        counts[((t / dt) as usize).min(bins - 1)] += 1.0 / dt;
    }
    let peak = counts.iter().cloned().fold(1.0, f64::max);
    frame(svg, x0, "generated tokens/s over time", end, peak.round(), "seconds since the first request");
    let (left, bottom) = (x0 + PAD, 30.0 + H - PAD + 10.0);
    let (width, height) = (W - PAD - 10.0, H - PAD - 30.0);
    let points: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{:.1},{:.1}", left + (i as f64 + 0.5) * width / bins as f64, bottom - c / peak * height))
        .collect();
    let _ = write!(svg, r##"<polyline fill="none" stroke="#c0504d" stroke-width="2" points="{}"/>"##, points.join(" "));
}
