//! `bench serve --plot`: histograms of TTFT and inter-token latency, and generated tokens/s over
//! time, drawn with plotters' SVG backend. Text stays SVG `<text>` (plotters only estimates its
//! size), so the file needs no font files and opens in any browser.

use plotters::coord::Shift;
use plotters::prelude::*;
use twinfer::bench::serve::ServeReport;

const PANEL: (u32, u32) = (360, 240);
const BAR: RGBColor = RGBColor(0x4a, 0x7f, 0xb5);
const LINE: RGBColor = RGBColor(0xc0, 0x50, 0x4d);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The report's three charts side by side, as an SVG document.
pub fn serve_svg(r: &ServeReport) -> Result<String, String> {
    let ttft: Vec<f64> = r.requests.iter().filter_map(|(_, m)| m.ttft()).map(|s| s * 1e3).collect();
    let itl: Vec<f64> = r.requests.iter().flat_map(|(_, m)| m.itl()).map(|s| s * 1e3).collect();
    // Every token's absolute time, for throughput over time.
    let mut times: Vec<f64> = r.requests.iter().flat_map(|(t0, m)| m.token_times.iter().map(move |t| t0 + t)).collect();
    times.sort_by(f64::total_cmp);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (3 * PANEL.0, PANEL.1 + 24)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let title = format!(
            "twinfer bench serve: {} at scale x{} / concurrency x{}: {}",
            r.spec.name, r.scale, r.concurrency_scale, r.model_description
        );
        let body = root.titled(&title, ("sans-serif", 14)).map_err(err)?;
        let panels = body.split_evenly((1, 3));
        histogram(&panels[0], "TTFT", &ttft, "requests")?;
        histogram(&panels[1], "inter-token latency", &itl, "tokens")?;
        throughput(&panels[2], &times)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// 24 bins from 0 to the largest sample (ms).
fn histogram(area: &Area<'_>, what: &str, samples: &[f64], counted: &str) -> Result<(), String> {
    let bins = 24;
    let max = samples.iter().copied().fold(0.0, f64::max).max(1e-9);
    let mut counts = vec![0usize; bins];
    for &s in samples {
        counts[((s / max * bins as f64) as usize).min(bins - 1)] += 1;
    }
    let peak = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{what}, {} samples", samples.len()), ("sans-serif", 12))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..max, 0usize..peak + peak.div_ceil(10))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("ms")
        .y_desc(counted)
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|v| ms_label(*v, max))
        .draw()
        .map_err(err)?;
    let width = max / bins as f64;
    chart
        .draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, &c)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0), (x0 + 0.92 * width, c)], BAR.filled())
        }))
        .map_err(err)?;
    Ok(())
}

/// A tick label with as many decimals as the axis's range needs.
fn ms_label(v: f64, max: f64) -> String {
    let decimals = if max >= 50.0 {
        0
    } else if max >= 5.0 {
        1
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// Tokens generated per second in 30 windows from the first request to the last token.
fn throughput(area: &Area<'_>, times: &[f64]) -> Result<(), String> {
    let end = times.last().copied().unwrap_or(1.0).max(1e-3);
    let bins = 30;
    let dt = end / bins as f64;
    let mut rates = vec![0f64; bins];
    for &t in times {
        rates[((t / dt) as usize).min(bins - 1)] += 1.0 / dt;
    }
    let peak = rates.iter().copied().fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("generated tokens/s over time", ("sans-serif", 12))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("seconds since the first request")
        .y_desc("tokens/s")
        .x_labels(5)
        .y_labels(5)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    let points = rates.iter().enumerate().map(|(i, &r)| ((i as f64 + 0.5) * dt, r));
    chart.draw_series(LineSeries::new(points, LINE.stroke_width(2))).map_err(err)?;
    Ok(())
}
