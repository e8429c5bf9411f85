//! PNG plots for reports: the training loss curve and the CMC curve. The font is embedded, so
//! nothing depends on fonts installed on the machine.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

type Error = Box<dyn std::error::Error>;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        );
    });
}

/// Total loss against step, with a moving average.
pub fn loss_curve(points: &[(u64, f64)], out: &Path) -> Result<(), Error> {
    register_font();
    let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    let x_max = finite.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let x_min = finite.iter().map(|p| p.0).min().unwrap_or(0);
    let y_max = finite.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "training loss (weighted sum of the enabled tasks)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    chart.draw_series(LineSeries::new(
        finite.iter().copied(),
        RGBColor(170, 190, 230),
    ))?;
    let w = (finite.len() / 50).max(1);
    let smooth: Vec<(u64, f64)> = finite
        .windows(w)
        .map(|win| {
            (
                win[win.len() - 1].0,
                win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64,
            )
        })
        .collect();
    chart.draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

/// CMC curves (rank 1..n) of one or more methods.
pub fn cmc_curve(curves: &[(&str, &[f64])], out: &Path) -> Result<(), Error> {
    register_font();
    let root = BitMapBackend::new(out, (700, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = curves.iter().map(|c| c.1.len()).max().unwrap_or(1).max(2);
    let mut chart = ChartBuilder::on(&root)
        .caption("CMC (Market-1501 protocol)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1..n, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("rank")
        .y_desc("matching rate")
        .draw()?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (k, (name, cmc)) in curves.iter().enumerate() {
        let c = colours[k % colours.len()];
        chart
            .draw_series(LineSeries::new(
                cmc.iter().enumerate().map(|(i, v)| (i + 1, *v)),
                c.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
