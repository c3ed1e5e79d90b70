//! Printing: results on stdout (text or JSON), errors on stderr.

use crate::context::OutputFormat;

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints an error once on stderr (`coord: ...`), and with `--output json`
/// also a JSON object on stdout for pipelines.
pub fn print_error(format: OutputFormat, err: &anyhow::Error, exit_code: u8) {
    eprintln!("coord: {err:#}");
    if format == OutputFormat::Json {
        let library = err.chain().find_map(|c| c.downcast_ref::<coord::Error>());
        let value = serde_json::json!({
            "error": format!("{err:#}"),
            "exit_code": exit_code,
            "sqlstate": library.and_then(coord::Error::sqlstate),
            "retryable": library.is_some_and(coord::Error::is_retryable),
        });
        println!("{value}");
    }
}

/// A plain text table: a header row and left-aligned columns.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// `-` for a missing value.
pub fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}
