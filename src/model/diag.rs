//! Positioned diagnostics for configuration files.
//!
//! Every error the config loader finds carries a byte span into the source text. This module
//! turns spans into `file:line:col` and renders rustc-style reports with the offending line and
//! a caret under the span. Rendering is deterministic (no terminal width, no colour) so error
//! output can be pinned by tests. Pure: no I/O.

use serde::Serialize;
use std::fmt::Write as _;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Byte offset of the span start.
    pub offset: usize,
    /// Byte length of the span (0 is rendered as a single caret).
    pub len: usize,
    pub message: String,
    /// Short text printed next to the caret.
    pub label: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(span: (usize, usize), message: impl Into<String>) -> Self {
        Diagnostic {
            offset: span.0,
            len: span.1,
            message: message.into(),
            label: String::new(),
            help: None,
        }
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Machine-readable form of a diagnostic (`appliance check --output json`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
}

/// All diagnostics of one file, with the text they point into.
#[derive(Debug, Clone)]
pub struct Report {
    pub file: String,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..floor_char_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl Report {
    /// The first [`LOCATED_MAX`] diagnostics, positioned.
    pub fn located(&self) -> Vec<Located> {
        self.diagnostics
            .iter()
            .take(LOCATED_MAX)
            .map(|d| {
                let (line, column) = line_col(&self.source, d.offset);
                Located {
                    file: self.file.clone(),
                    line,
                    column,
                    message: d.message.clone(),
                    label: d.label.clone(),
                    help: d.help.clone(),
                }
            })
            .collect()
    }

    /// Human-readable report of the first [`RENDERED_MAX`] diagnostics, then a count line.
    /// Bounded whatever the input: hostile user-data can hold thousands of errors on one
    /// 32 KiB line, which rendered in full came to hundreds of MiB.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in self.diagnostics.iter().take(RENDERED_MAX) {
            self.render_one(d, &mut out);
            out.push('\n');
        }
        let n = self.diagnostics.len();
        if n > RENDERED_MAX {
            let _ = writeln!(out, "... {} more errors not shown\n", n - RENDERED_MAX);
        }
        let _ = writeln!(
            out,
            "{}: {} error{} found; nothing was applied",
            self.file,
            n,
            if n == 1 { "" } else { "s" }
        );
        out
    }

    fn render_one(&self, d: &Diagnostic, out: &mut String) {
        let (line, column) = line_col(&self.source, d.offset);
        let full = self.source.lines().nth(line - 1).unwrap_or("");
        // A long line is shown as a window around the column.
        let (text, column) = window(full, column);
        let text = text.as_str();
        let gutter = line.to_string().len();
        let pad = " ".repeat(gutter);
        let _ = writeln!(out, "error: {}", d.message);
        let _ = writeln!(out, "{pad}--> {}:{line}:{column}", self.file);
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{line} | {}", text.replace('\t', " "));
        let span_chars = self
            .source
            .get(d.offset..(d.offset + d.len).min(self.source.len()))
            .map(|s| s.split('\n').next().unwrap_or("").chars().count())
            .unwrap_or(0);
        let available = text.chars().count().saturating_sub(column - 1);
        let carets = span_chars.min(available).max(1);
        let _ = write!(
            out,
            "{pad} | {}{}",
            " ".repeat(column - 1),
            "^".repeat(carets)
        );
        if d.label.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, " {}", d.label);
        }
        if let Some(help) = &d.help {
            let _ = writeln!(out, "{pad} = help: {help}");
        }
    }
}

/// Diagnostics rendered in full by [`Report::render`]; the rest are counted.
pub const RENDERED_MAX: usize = 20;
/// Diagnostics [`Report::located`] returns.
pub const LOCATED_MAX: usize = 100;
/// Characters of a source line shown; a longer line is cut around the column.
const LINE_SHOWN: usize = 120;

/// `line` cut to at most [`LINE_SHOWN`] characters around 1-based `column` (with `...` where
/// it was cut), and the column within what is shown.
fn window(line: &str, column: usize) -> (String, usize) {
    let n = line.chars().count();
    if n <= LINE_SHOWN {
        return (line.to_string(), column);
    }
    let start = column
        .saturating_sub(LINE_SHOWN / 3 + 1)
        .min(n - LINE_SHOWN);
    let mut shown: String = line.chars().skip(start).take(LINE_SHOWN).collect();
    let mut col = column - start;
    if start > 0 {
        shown.insert_str(0, "...");
        col += 3;
    }
    if start + LINE_SHOWN < n {
        shown.push_str("...");
    }
    (shown, col)
}

/// Closest candidate by edit distance, for "did you mean" hints.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let src = "a\nbé c\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 2), (2, 1));
        assert_eq!(line_col(src, src.find('c').unwrap()), (2, 4));
    }

    #[test]
    fn render_points_a_caret_under_the_span() {
        let r = Report {
            file: "x.kdl".into(),
            source: "site {\n    links 0\n}\n".into(),
            diagnostics: vec![Diagnostic::new((17, 1), "bad").label("here").help("fix it")],
        };
        let text = r.render();
        assert!(text.contains(" --> x.kdl:2:11\n"), "{text}");
        assert!(
            text.contains("2 |     links 0\n  |           ^ here\n"),
            "{text}"
        );
        assert!(text.contains("  = help: fix it\n"), "{text}");
        assert!(text.ends_with("x.kdl: 1 error found; nothing was applied\n"));
    }

    #[test]
    fn suggest_finds_near_misses_only() {
        assert_eq!(
            suggest("site-prefx", &["site-prefix", "mtu"]),
            Some("site-prefix")
        );
        assert_eq!(suggest("banana", &["site-prefix", "mtu"]), None);
    }
}
