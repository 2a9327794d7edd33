//! The report's pictures (plotters, PNG) and the run's progress bar
//! (indicatif).

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Where the report's text font comes from (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn font() -> Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT)
                .map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core)"))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
                .map_err(|_| format!("{FONT} is not a usable font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A grouped bar chart: one group per x label, one bar per series.
pub(crate) struct Bars {
    pub(crate) title: String,
    pub(crate) y_label: String,
    pub(crate) groups: Vec<String>,
    pub(crate) series: Vec<(String, Vec<f64>)>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
];

/// Draws `b` into the PNG at `path`.
pub(crate) fn bars(path: &Path, b: &Bars) -> Result<()> {
    font()?;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (960, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = b
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let n = b.groups.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(&b.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n as f64, 0f64..max * 1.4)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(b.y_label.as_str())
            .label_style(("sans-serif", 13))
            .draw()?;
        let k = b.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (si, (name, values)) in b.series.iter().enumerate() {
            let colour = COLOURS[si % COLOURS.len()];
            let x0 = |g: usize| g as f64 + 0.1 + width * si as f64;
            chart
                .draw_series(values.iter().enumerate().map(|(g, v)| {
                    Rectangle::new([(x0(g), 0.0), (x0(g) + width * 0.92, *v)], colour.filled())
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled())
                });
        }
        for (g, label) in b.groups.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            root.draw(&Text::new(
                label.clone(),
                (px - 6 * label.len() as i32 / 2, py + 10),
                ("sans-serif", 13),
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot draw {}", path.display()))
}

/// The run's progress: a bar on a terminal, plain lines otherwise (CI logs).
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

fn current() -> &'static Mutex<Progress> {
    static P: OnceLock<Mutex<Progress>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Progress { bar: None }))
}

/// Starts a stage of `steps` steps named `name`.
pub(crate) fn stage(name: &str, steps: u64) {
    let mut p = current().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = p.bar.take() {
        b.finish_and_clear();
    }
    if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(steps);
        b.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_prefix(name.to_string());
        b.enable_steady_tick(Duration::from_millis(200));
        p.bar = Some(b);
    } else {
        eprintln!("[{name}] {steps} steps");
    }
}

/// One step of the current stage begins: `msg` says what.
pub(crate) fn step(stage: &str, msg: &str) {
    let p = current().lock().unwrap_or_else(|e| e.into_inner());
    match &p.bar {
        Some(b) => {
            b.inc(1);
            b.set_message(msg.to_string());
        }
        None => eprintln!("[{stage}] {msg}"),
    }
}

/// Ends the run's progress display.
pub(crate) fn finish() {
    let mut p = current().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = p.bar.take() {
        b.finish_and_clear();
    }
}
