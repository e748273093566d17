//! How `machinectl` prints results: a table by default, `-o json` or `-o yaml`.
//!
//! Every API command builds [`Records`]: named columns and rows of JSON values (the
//! node's address first). A table prints them aligned under upper-case headers; JSON and
//! YAML print the rows as a list of objects with the same keys, in the same order.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde_json::{Map, Value};

/// The output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns with a header.
    #[default]
    Table,
    /// A JSON array of objects.
    Json,
    /// A YAML list of objects.
    Yaml,
}

/// Rows with named columns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Records {
    /// Column keys (lower case; the table header upper-cases them).
    pub columns: Vec<String>,
    /// The rows, each with a value for every column.
    pub rows: Vec<Map<String, Value>>,
}

impl Records {
    /// Empty records with these columns.
    pub fn new(columns: &[&str]) -> Records {
        Records {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; `values` go to the columns in order.
    pub fn push(&mut self, values: Vec<Value>) {
        let row = self.columns.iter().cloned().zip(values).collect();
        self.rows.push(row);
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Renders records in a format.
pub fn render(records: &Records, format: Format) -> String {
    match format {
        Format::Table => table(records),
        Format::Json => {
            let rows: Vec<Value> = records.rows.iter().cloned().map(Value::Object).collect();
            let mut s = serde_json::to_string_pretty(&rows).unwrap_or_default();
            s.push('\n');
            s
        }
        Format::Yaml => {
            let rows: Vec<Value> = records.rows.iter().cloned().map(Value::Object).collect();
            yaml_serde::to_string(&rows).unwrap_or_default()
        }
    }
}

fn table(records: &Records) -> String {
    let headers: Vec<String> = records.columns.iter().map(|c| c.to_uppercase()).collect();
    let cells: Vec<Vec<String>> = records
        .rows
        .iter()
        .map(|row| {
            records
                .columns
                .iter()
                .map(|c| row.get(c).map(cell).unwrap_or_default())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |row: &[String]| {
        let mut text = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                text.push_str(c);
            } else {
                let _ = write!(text, "{c:<w$}   ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers);
    for row in &cells {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Records {
        let mut r = Records::new(&["node", "name", "ready"]);
        r.push(vec![json!("10.5.0.2"), json!("containerd"), json!(true)]);
        r.push(vec![json!("10.5.0.2"), json!("kubelet"), json!(false)]);
        r
    }

    #[test]
    fn formats() {
        assert_eq!(
            render(&sample(), Format::Table),
            "NODE       NAME         READY\n10.5.0.2   containerd   yes\n10.5.0.2   kubelet      no\n"
        );
        let json: Value =
            serde_json::from_str(&render(&sample(), Format::Json)).unwrap_or_default();
        assert_eq!(json[1]["name"], "kubelet");
        assert_eq!(json[0]["ready"], true);
        let yaml = render(&sample(), Format::Yaml);
        assert!(
            yaml.starts_with("- node: 10.5.0.2\n  name: containerd\n  ready: true\n"),
            "{yaml}"
        );
        assert_eq!(render(&Records::new(&["a"]), Format::Table), "A\n");
        assert_eq!(render(&Records::new(&["a"]), Format::Json), "[]\n");
    }
}
