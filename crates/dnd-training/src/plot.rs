//! Minimal PNG charts (a line chart of a loss curve, a grouped bar chart of accuracies), drawn
//! into a pixel buffer: enough to look at, no plotting stack to build.

use std::path::Path;

use dnd_core::error::{DndError, Result};

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 30;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < W && y < H {
            let i = (y * W + x) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as usize, y.round() as usize, rgb);
            self.set(x.round() as usize, y.round() as usize + 1, rgb);
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, rgb: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, rgb);
            }
        }
    }

    fn axes(&mut self) {
        let grey = [90, 90, 90];
        self.line(
            (MARGIN as f64, MARGIN as f64),
            (MARGIN as f64, (H - MARGIN) as f64),
            grey,
        );
        self.line(
            (MARGIN as f64, (H - MARGIN) as f64),
            ((W - MARGIN) as f64, (H - MARGIN) as f64),
            grey,
        );
    }

    fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| DndError::io(parent, e))?;
        }
        let file = std::fs::File::create(path).map_err(|e| DndError::io(path, e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let io = |e: png::EncodingError| DndError::io(path, std::io::Error::other(e));
        enc.write_header()
            .map_err(io)?
            .write_image_data(&self.px)
            .map_err(io)
    }
}

/// A line chart of `values` (x = index), y from 0 to the maximum, on a log scale when the
/// values span more than two decades.
pub fn line_chart(values: &[f32], path: impl AsRef<Path>) -> Result<()> {
    let mut c = Canvas::new();
    c.axes();
    let finite: Vec<f64> = values
        .iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|&v| v as f64)
        .collect();
    if finite.len() >= 2 {
        let (lo, hi) = finite
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let log = hi / lo > 100.0;
        let f = |v: f64| if log { v.ln() } else { v };
        let (flo, fhi) = (if log { f(lo) } else { 0.0 }, f(hi));
        let span = (fhi - flo).max(f64::MIN_POSITIVE);
        let pw = (W - 2 * MARGIN) as f64;
        let ph = (H - 2 * MARGIN) as f64;
        let pt = |i: usize, v: f64| {
            (
                MARGIN as f64 + pw * i as f64 / (finite.len() - 1) as f64,
                (H - MARGIN) as f64 - ph * (f(v) - flo) / span,
            )
        };
        for i in 1..finite.len() {
            c.line(pt(i - 1, finite[i - 1]), pt(i, finite[i]), [31, 119, 180]);
        }
    }
    c.save(path.as_ref())
}

/// Groups of bars (values in [0, 1]); each group is one row of `groups`, bars coloured by
/// position in the row.
pub fn bar_chart(groups: &[Vec<f64>], path: impl AsRef<Path>) -> Result<()> {
    const COLORS: [[u8; 3]; 4] = [
        [127, 127, 127],
        [31, 119, 180],
        [44, 160, 44],
        [214, 39, 40],
    ];
    let mut c = Canvas::new();
    c.axes();
    let n = groups.len().max(1);
    let gw = (W - 2 * MARGIN) / n;
    for (g, bars) in groups.iter().enumerate() {
        let bw = (gw * 3 / 4) / bars.len().max(1);
        for (b, &v) in bars.iter().enumerate() {
            let x0 = MARGIN + g * gw + gw / 8 + b * bw;
            let h = ((H - 2 * MARGIN) as f64 * v.clamp(0.0, 1.0)) as usize;
            c.rect(
                x0,
                H - MARGIN - h,
                x0 + bw - 1,
                H - MARGIN,
                COLORS[b % COLORS.len()],
            );
        }
    }
    c.save(path.as_ref())
}
