//! `-o json|yaml|wide`, shared by every command that prints objects, and the plain-text
//! table the human formats are drawn with.

use clap::Args;
use serde::Serialize;

/// A machine or wide format; without `-o` each command prints its human form (cards for
/// secrets, a table for keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
    /// A table with every column (description, key id, ready reason, ...).
    Wide,
}

/// `-o/--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Output format [default: human-readable].
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub output: Option<Format>,
}

/// Serialise `value` as JSON or YAML; `None` for the human formats.
pub fn serialised<T: Serialize + ?Sized>(
    value: &T,
    format: Option<Format>,
) -> anyhow::Result<Option<String>> {
    Ok(match format {
        Some(Format::Json) => Some(serde_json::to_string_pretty(value)? + "\n"),
        Some(Format::Yaml) => Some(serde_yaml::to_string(value)?),
        Some(Format::Wide) | None => None,
    })
}

/// A left-aligned table, columns two spaces apart, like `kubectl get`. Control characters in
/// cells (a description with a newline or an escape) become spaces, so one row stays one
/// line and a cell cannot drive the terminal.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |cell: &str| -> String {
        cell.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| clean(c)).collect())
        .collect();
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_flatten_control_characters() {
        let text = table(
            &["A", "LONGER"],
            &[
                vec!["wide-cell".into(), "x".into()],
                vec!["b".into(), "two\nlines\u{1b}[31m".into()],
            ],
        );
        assert_eq!(
            text,
            "A          LONGER\nwide-cell  x\nb          two lines [31m\n"
        );
    }

    #[test]
    fn only_json_and_yaml_are_serialised() {
        let value = serde_json::json!({"a": 1});
        assert_eq!(
            serialised(&value, Some(Format::Json)).unwrap().unwrap(),
            "{\n  \"a\": 1\n}\n"
        );
        assert_eq!(
            serialised(&value, Some(Format::Yaml)).unwrap().unwrap(),
            "a: 1\n"
        );
        assert_eq!(serialised(&value, Some(Format::Wide)).unwrap(), None);
        assert_eq!(serialised(&value, None).unwrap(), None);
    }
}
