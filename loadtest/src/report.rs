//! Result files: JSON, a short Markdown report, and SVG charts.

use crate::stats::Machine;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The command line as typed, with the program's directory removed.
pub fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        let base = Path::new(first.as_str())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        *first = base;
    }
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[derive(Serialize)]
pub struct Envelope<'a, P: Serialize, R: Serialize> {
    pub scenario: &'a str,
    pub target: &'a str,
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub params: P,
    pub results: R,
}

pub struct Output<'a> {
    pub dir: &'a Path,
    pub name: String,
}

impl Output<'_> {
    pub fn write_json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir)?;
        let path = self.dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }

    pub fn write_md(&self, text: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir)?;
        let path = self.dir.join(format!("{}.md", self.name));
        std::fs::write(&path, text)?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }

    /// Writes `NAME-SUFFIX.svg` and returns its file name for linking.
    pub fn write_svg(&self, suffix: &str, svg: &str) -> anyhow::Result<String> {
        std::fs::create_dir_all(self.dir)?;
        let file = format!("{}-{suffix}.svg", self.name);
        std::fs::write(self.dir.join(&file), svg)?;
        Ok(file)
    }
}

pub fn machine_md(m: &Machine) -> String {
    format!(
        "Machine: {} cores ({}), {} GiB RAM, Linux {}, open-files limit {}; 1-minute load average at the start: {:.2}.\n",
        m.cores, m.cpu_model, m.memory_gib, m.kernel, m.open_files_limit, m.load_average_1m
    )
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(t);
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v.abs() >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A line chart. With `log_x`, x values must be positive and the axis is log10.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let (w, h) = (720.0, 400.0);
    let (ml, mr, mt, mb) = (70.0, 150.0, 40.0, 50.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in pts {
        x0 = x0.min(tx(*x));
        x1 = x1.max(tx(*x));
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        x0 = 0.0;
        x1 = 1.0;
    }
    if (x1 - x0).abs() < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let y1 = y1 * 1.05;
    let sx = |x: f64| ml + (tx(x) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - y / y1 * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        ml + pw / 2.0,
        esc(title)
    );
    // Axes and grid.
    for t in nice_ticks(0.0, y1, 5) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let xticks: Vec<f64> = if log_x {
        let mut v = Vec::new();
        let mut e = x0.floor();
        while e <= x1.ceil() {
            for m in [1.0, 2.0, 5.0] {
                let val = 10f64.powf(e) * m;
                if val.log10() >= x0 - 1e-9 && val.log10() <= x1 + 1e-9 {
                    v.push(val);
                }
            }
            e += 1.0;
        }
        v
    } else {
        nice_ticks(x0, x1, 6)
    };
    for t in xticks {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            mt + ph,
            mt + ph + 16.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
        ml + pw / 2.0,
        h - 12.0,
        esc(x_label),
        mt + ph / 2.0,
        mt + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = ser
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = mt + 14.0 + i as f64 * 18.0;
        let lx = ml + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A grouped bar chart: one group per category, one bar per series.
pub fn bar_chart(title: &str, y_label: &str, categories: &[String], series: &[Series]) -> String {
    let (w, h) = (720.0, 400.0);
    let (ml, mr, mt, mb) = (70.0, 150.0, 40.0, 60.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let mut y1 = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let y1 = y1 * 1.1;
    let sy = |y: f64| mt + ph - y / y1 * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        ml + pw / 2.0,
        esc(title)
    );
    for t in nice_ticks(0.0, y1, 5) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let groups = categories.len().max(1) as f64;
    let gw = pw / groups;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (ci, cat) in categories.iter().enumerate() {
        let gx = ml + ci as f64 * gw;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            mt + ph + 16.0,
            esc(cat)
        );
        for (si, ser) in series.iter().enumerate() {
            let v = ser.points.get(ci).map(|p| p.1).unwrap_or(0.0);
            let x = gx + gw * 0.1 + si as f64 * bw;
            let y = sy(v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                bw * 0.95,
                (mt + ph - y).max(0.0),
                COLORS[si % COLORS.len()],
                x + bw / 2.0,
                y - 3.0,
                fmt_tick(v)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>
<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
        mt + ph / 2.0,
        mt + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let ly = mt + 14.0 + i as f64 * 18.0;
        let lx = ml + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="14" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            ly - 6.0,
            COLORS[i % COLORS.len()],
            lx + 20.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 20);
        assert!(s.ends_with('Z'));
    }

    #[test]
    fn charts_render() {
        let ser = vec![Series {
            name: "a".into(),
            points: vec![(0.1, 0.0), (1.0, 0.5), (10.0, 1.0)],
        }];
        let svg = line_chart("t", "x", "y", &ser, true);
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        let svg = bar_chart("t", "y", &["c".into()], &ser);
        assert!(svg.contains("<rect"));
    }
}
