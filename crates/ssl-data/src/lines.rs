//! Line-based files read as a data set: JSON Lines, CSV / TSV and plain text.
//!
//! Opening a file scans it once, in order and in bounded memory, for its record boundaries: it
//! is cut into *units* of at most [`UNIT_ROWS`] records or [`UNIT_BYTES`] bytes, which play the
//! part of Parquet row groups (the loader deals, shuffles and resumes by unit). Columns and
//! their types come from the first [`INFER_ROWS`] records. A unit is read later by seeking to
//! its byte range and parsing only it, into Arrow arrays of the requested columns; a record
//! that cannot be parsed (malformed JSON, a wrong number of CSV fields, a cell that does not
//! fit its column's type) is reported with its line number and becomes a bad row.
//!
//! * JSON Lines (`.jsonl`, `.ndjson`, `.json`): one JSON object per line, a field per column.
//! * CSV (`.csv`, comma) and TSV (`.tsv`, tab): RFC 4180 quoting (a quoted field may hold the
//!   delimiter, `""` and line breaks); a header row names the columns. A file whose first row
//!   is numbers only has no header: it is read UCR-style, the first field a `label` (string)
//!   column and the rest one series, an `x` (`list<f32>`) column.
//! * Plain text (`.txt`): one document per non-blank line, a `text` column (as `run_mlm.py
//!   --line_by_line` and the Hugging Face `text` loader read it).
//!
//! Blank lines are not records. A UTF-8 byte-order mark at the start of a file is ignored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int64Builder,
    ListBuilder, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;

use crate::error::DataError;

/// Records per unit at most (the row-group size of the project's Parquet files).
pub(crate) const UNIT_ROWS: usize = 2048;
/// Bytes per unit at most (a unit always holds at least one record).
pub(crate) const UNIT_BYTES: u64 = 4 << 20;
/// Records read to infer the columns and their types.
pub(crate) const INFER_ROWS: usize = 1000;

/// Which kind of line-based file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineFormat {
    /// JSON Lines.
    Json,
    /// Delimited values with this delimiter (`,` or tab).
    Csv(u8),
    /// Plain text, one document per line.
    Text,
}

impl LineFormat {
    /// The format named by a file's extension, if it is a line-based one.
    pub(crate) fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" => Some(LineFormat::Json),
            "csv" => Some(LineFormat::Csv(b',')),
            "tsv" => Some(LineFormat::Csv(b'\t')),
            "txt" => Some(LineFormat::Text),
            _ => None,
        }
    }

    /// The format's name in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            LineFormat::Json => "JSON Lines",
            LineFormat::Csv(b'\t') => "TSV",
            LineFormat::Csv(_) => "CSV",
            LineFormat::Text => "text",
        }
    }
}

/// A run of records of a file: the loader's unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unit {
    /// Byte offset of the unit's first record.
    pub(crate) start: u64,
    /// Byte offset just past its last record.
    pub(crate) end: u64,
    /// Line number (1-based) of its first record.
    pub(crate) first_line: usize,
    /// Records in the unit.
    pub(crate) rows: usize,
}

/// How a CSV file maps to columns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CsvLayout {
    /// A header row named the columns; every record has that many fields.
    Header(usize),
    /// No header (the first row was numbers only): a label, then one series.
    Ucr,
}

/// One line-based file, scanned: its columns and units.
#[derive(Debug)]
pub(crate) struct LineFile {
    path: PathBuf,
    format: LineFormat,
    csv: Option<CsvLayout>,
    schema: SchemaRef,
    units: Vec<Unit>,
}

/// A record found by [`Records`].
struct Record {
    /// Line number (1-based) of its first line.
    line: usize,
    /// Byte offset of its start.
    start: u64,
    /// Byte offset just past it (terminator included).
    end: u64,
    /// A CSV record whose quoted field runs to the end of the input.
    unterminated: bool,
}

/// Splits a byte stream into records: lines, or for CSV lines joined while a quoted field is
/// open. The record's bytes, without the line terminator, are in `buf`.
struct Records<R> {
    reader: R,
    csv: bool,
    line: usize,
    offset: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Records<R> {
    fn new(reader: R, csv: bool, first_line: usize, offset: u64) -> Self {
        Records {
            reader,
            csv,
            line: first_line.saturating_sub(1),
            offset,
            buf: Vec::new(),
        }
    }

    fn next(&mut self) -> std::io::Result<Option<Record>> {
        self.buf.clear();
        let start = self.offset;
        let line = self.line + 1;
        let mut quotes = 0usize;
        loop {
            let from = self.buf.len();
            let n = self.reader.read_until(b'\n', &mut self.buf)?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                break;
            }
            self.offset += n as u64;
            self.line += 1;
            if self.csv {
                quotes += self.buf[from..].iter().filter(|&&b| b == b'"').count();
            }
            if !self.csv || quotes.is_multiple_of(2) || self.buf.last() != Some(&b'\n') {
                break;
            }
        }
        let unterminated = self.csv && !quotes.is_multiple_of(2);
        while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
            self.buf.pop();
        }
        if start == 0 && self.buf.starts_with(b"\xEF\xBB\xBF") {
            self.buf.drain(..3);
        }
        Ok(Some(Record {
            line,
            start,
            end: self.offset,
            unterminated,
        }))
    }

    fn blank(&self) -> bool {
        self.buf.iter().all(u8::is_ascii_whitespace)
    }
}

/// Splits one CSV record (terminator removed) into fields, undoing the quoting.
pub(crate) fn split_csv(record: &str, delimiter: u8) -> Result<Vec<String>, String> {
    let delimiter = char::from(delimiter);
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut field_start = true;
    let mut chars = record.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        if c == '"' && field_start {
            quoted = true;
        } else if c == delimiter {
            fields.push(std::mem::take(&mut field));
            field_start = true;
            continue;
        } else {
            field.push(c);
        }
        field_start = false;
    }
    if quoted {
        return Err("a quoted field is not closed before the end of the file".into());
    }
    fields.push(field);
    Ok(fields)
}

fn list_of(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(t, true)))
}

fn series1() -> DataType {
    list_of(DataType::Float32)
}

fn series2() -> DataType {
    list_of(list_of(DataType::Float32))
}

/// What the values of one column seen so far allow its type to be.
#[derive(Debug, Clone)]
struct Guess {
    any: bool,
    int: bool,
    num: bool,
    boolean: bool,
    list1: bool,
    list2: bool,
}

impl Default for Guess {
    fn default() -> Self {
        Guess {
            any: false,
            int: true,
            num: true,
            boolean: true,
            list1: true,
            list2: true,
        }
    }
}

fn is_num_array(v: &Value) -> bool {
    matches!(v, Value::Array(items) if items.iter().all(|x| x.is_number() || x.is_null()))
}

impl Guess {
    fn json(&mut self, v: &Value) {
        if v.is_null() {
            return;
        }
        self.any = true;
        self.int &= v.as_i64().is_some();
        self.num &= v.is_number();
        self.boolean &= v.is_boolean();
        self.list1 &= is_num_array(v);
        self.list2 &= matches!(v, Value::Array(items)
            if items.iter().all(|x| x.is_null() || is_num_array(x)));
    }

    fn cell(&mut self, s: &str) {
        let t = s.trim();
        if t.is_empty() {
            return;
        }
        if t.starts_with('[') {
            match serde_json::from_str::<Value>(t) {
                Ok(v) if v.is_array() => return self.json(&v),
                _ => {}
            }
        }
        self.any = true;
        self.int &= t.parse::<i64>().is_ok();
        self.num &= t.parse::<f64>().is_ok();
        self.boolean &= t.eq_ignore_ascii_case("true") || t.eq_ignore_ascii_case("false");
        self.list1 = false;
        self.list2 = false;
    }

    fn data_type(&self) -> DataType {
        if !self.any {
            DataType::Utf8
        } else if self.int {
            DataType::Int64
        } else if self.num {
            DataType::Float64
        } else if self.boolean {
            DataType::Boolean
        } else if self.list1 {
            series1()
        } else if self.list2 {
            series2()
        } else {
            DataType::Utf8
        }
    }
}

/// Builds one column of a unit, appending a null for a value that does not fit (so every
/// column keeps one entry per record) and saying why.
enum Builder {
    Utf8(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    List1(ListBuilder<Float32Builder>),
    List2(ListBuilder<ListBuilder<Float32Builder>>),
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn push_floats(b: &mut Float32Builder, items: &[Value]) -> Result<(), String> {
    for (i, x) in items.iter().enumerate() {
        match x {
            Value::Null => b.append_null(),
            Value::Number(n) => b.append_value(n.as_f64().unwrap_or(f64::NAN) as f32),
            other => return Err(format!("element {i} is {}, not a number", json_kind(other))),
        }
    }
    Ok(())
}

impl Builder {
    fn new(t: &DataType) -> Self {
        match t {
            DataType::Int64 => Builder::Int(Int64Builder::new()),
            DataType::Float64 => Builder::Float(Float64Builder::new()),
            DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
            t if *t == series1() => Builder::List1(ListBuilder::new(Float32Builder::new())),
            t if *t == series2() => {
                Builder::List2(ListBuilder::new(ListBuilder::new(Float32Builder::new())))
            }
            _ => Builder::Utf8(StringBuilder::new()),
        }
    }

    fn null(&mut self) {
        match self {
            Builder::Utf8(b) => b.append_null(),
            Builder::Int(b) => b.append_null(),
            Builder::Float(b) => b.append_null(),
            Builder::Bool(b) => b.append_null(),
            Builder::List1(b) => b.append_null(),
            Builder::List2(b) => b.append_null(),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Builder::Utf8(_) => "a string",
            Builder::Int(_) => "an integer",
            Builder::Float(_) => "a number",
            Builder::Bool(_) => "a boolean",
            Builder::List1(_) => "an array of numbers",
            Builder::List2(_) => "an array of arrays of numbers",
        }
    }

    /// Appends a JSON value (absent = null).
    fn json(&mut self, v: Option<&Value>) -> Result<(), String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            self.null();
            return Ok(());
        };
        let expected = self.type_name();
        let mismatch = |v: &Value| {
            format!(
                "{} where the column's first rows made it {expected}",
                json_kind(v)
            )
        };
        let result = match (&mut *self, v) {
            (Builder::Utf8(b), Value::String(s)) => {
                b.append_value(s);
                Ok(())
            }
            (Builder::Utf8(b), other) => {
                b.append_value(other.to_string());
                Ok(())
            }
            (Builder::Int(b), Value::Number(n)) => match n.as_i64() {
                Some(i) => {
                    b.append_value(i);
                    Ok(())
                }
                None => Err(format!(
                    "{n} where the column's first rows made it {expected}"
                )),
            },
            (Builder::Float(b), Value::Number(n)) => {
                b.append_value(n.as_f64().unwrap_or(f64::NAN));
                Ok(())
            }
            (Builder::Bool(b), Value::Bool(x)) => {
                b.append_value(*x);
                Ok(())
            }
            (Builder::List1(b), Value::Array(items)) => {
                let r = push_floats(b.values(), items);
                if r.is_ok() {
                    b.append(true);
                }
                r
            }
            (Builder::List2(b), Value::Array(chans)) => {
                let mut r = Ok(());
                for (c, chan) in chans.iter().enumerate() {
                    r = match chan {
                        Value::Null => {
                            b.values().append_null();
                            Ok(())
                        }
                        Value::Array(items) => {
                            let inner = b.values();
                            let r = push_floats(inner.values(), items);
                            inner.append(true);
                            r
                        }
                        other => Err(format!("channel {c} is {}, not an array", json_kind(other))),
                    };
                    if r.is_err() {
                        break;
                    }
                }
                if r.is_ok() {
                    b.append(true);
                }
                r
            }
            (_, other) => Err(mismatch(other)),
        };
        if result.is_err() {
            // A list may have received part of its values: rebuild this entry as a null.
            self.discard_partial();
        }
        result
    }

    /// After a failed append: the builder holds either nothing for this entry (scalars) or
    /// some child values not yet closed into an entry (lists); close them as a null entry.
    fn discard_partial(&mut self) {
        match self {
            Builder::List1(b) => b.append(false),
            Builder::List2(b) => b.append(false),
            _ => self.null(),
        }
    }

    /// Appends a CSV cell (empty = null, or the empty string in a string column).
    fn cell(&mut self, s: &str) -> Result<(), String> {
        let t = s.trim();
        if let Builder::Utf8(b) = self {
            b.append_value(s);
            return Ok(());
        }
        if t.is_empty() {
            self.null();
            return Ok(());
        }
        let expected = self.type_name();
        let mismatch = || format!("'{t}' where the column's first rows made it {expected}");
        match self {
            Builder::Int(b) => match t.parse::<i64>() {
                Ok(i) => b.append_value(i),
                Err(_) => {
                    b.append_null();
                    return Err(mismatch());
                }
            },
            Builder::Float(b) => match t.parse::<f64>() {
                Ok(x) => b.append_value(x),
                Err(_) => {
                    b.append_null();
                    return Err(mismatch());
                }
            },
            Builder::Bool(b) => {
                if t.eq_ignore_ascii_case("true") {
                    b.append_value(true);
                } else if t.eq_ignore_ascii_case("false") {
                    b.append_value(false);
                } else {
                    b.append_null();
                    return Err(mismatch());
                }
            }
            Builder::List1(_) | Builder::List2(_) => match serde_json::from_str::<Value>(t) {
                Ok(v) => return self.json(Some(&v)),
                Err(e) => {
                    self.null();
                    return Err(format!("'{t}' is not a JSON array of numbers: {e}"));
                }
            },
            Builder::Utf8(_) => {}
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Utf8(b) => Arc::new(b.finish()),
            Builder::Int(b) => Arc::new(b.finish()),
            Builder::Float(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::List1(b) => Arc::new(b.finish()),
            Builder::List2(b) => Arc::new(b.finish()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Builder::Utf8(b) => b.len(),
            Builder::Int(b) => b.len(),
            Builder::Float(b) => b.len(),
            Builder::Bool(b) => b.len(),
            Builder::List1(b) => b.len(),
            Builder::List2(b) => b.len(),
        }
    }
}

/// A record that could not be read as the columns say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowProblem {
    /// The record's index within its unit.
    pub(crate) row: usize,
    /// Index (into the requested columns) of the column at fault; `None`: the whole record.
    pub(crate) column: Option<usize>,
    /// What was wrong, starting with the line number.
    pub(crate) reason: String,
}

/// The requested columns of one unit.
#[derive(Debug)]
pub(crate) struct UnitData {
    /// One array per requested column, in request order, one entry per record.
    pub(crate) arrays: Vec<ArrayRef>,
    /// Records that could not be read (their entries are null).
    pub(crate) problems: Vec<RowProblem>,
    /// Line number (1-based) of each record.
    pub(crate) lines: Vec<usize>,
}

fn utf8(bytes: &[u8], line: usize) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("line {line}: not UTF-8 text ({e})"))
}

/// The first record's fields are all numbers: a header-less, UCR-style file.
fn all_numbers(fields: &[String]) -> bool {
    fields.iter().all(|f| f.trim().parse::<f64>().is_ok())
}

impl LineFile {
    /// Scans `path`: its columns (from the first [`INFER_ROWS`] records) and its units.
    pub(crate) fn open(path: &Path, format: LineFormat) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let malformed = |line: usize, reason: String| DataError::Malformed {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let file = File::open(path).map_err(io)?;
        let csv_delim = match format {
            LineFormat::Csv(d) => Some(d),
            _ => None,
        };
        let mut records = Records::new(
            BufReader::with_capacity(1 << 20, file),
            csv_delim.is_some(),
            1,
            0,
        );
        let mut names: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut guesses: Vec<Guess> = Vec::new();
        let mut csv = None;
        let mut units = Vec::new();
        let mut current: Option<Unit> = None;
        let mut seen = 0usize;
        while let Some(rec) = records.next().map_err(io)? {
            if records.blank() {
                continue;
            }
            if let Some(delim) = csv_delim {
                if csv.is_none() {
                    let text = utf8(&records.buf, rec.line).map_err(|r| malformed(rec.line, r))?;
                    let fields = split_csv(text, delim).map_err(|r| malformed(rec.line, r))?;
                    if all_numbers(&fields) {
                        csv = Some(CsvLayout::Ucr);
                        names = vec!["label".into(), "x".into()];
                    } else {
                        for (i, f) in fields.iter().enumerate() {
                            let name = match f.trim() {
                                "" => format!("unnamed_{i}"),
                                n => n.to_string(),
                            };
                            if index.insert(name.clone(), i).is_some() {
                                return Err(malformed(
                                    rec.line,
                                    format!("the header names column '{name}' twice"),
                                ));
                            }
                            names.push(name);
                        }
                        guesses = vec![Guess::default(); names.len()];
                        csv = Some(CsvLayout::Header(names.len()));
                        continue;
                    }
                }
            }
            if seen == 0
                && format == LineFormat::Json
                && records.buf.trim_ascii_start().starts_with(b"[")
            {
                return Err(malformed(
                    rec.line,
                    "the file starts with '[': it looks like one JSON array, not JSON Lines (one object per line); convert it with `jq -c '.[]'`".into(),
                ));
            }
            if seen < INFER_ROWS {
                if let (Some(delim), Some(CsvLayout::Header(n))) = (csv_delim, &csv) {
                    if let Ok(fields) =
                        utf8(&records.buf, rec.line).and_then(|t| split_csv(t, delim))
                    {
                        if fields.len() == *n {
                            for (g, f) in guesses.iter_mut().zip(&fields) {
                                g.cell(f);
                            }
                        }
                    }
                } else if format == LineFormat::Json {
                    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&records.buf) {
                        for (k, v) in &map {
                            let i = *index.entry(k.clone()).or_insert_with(|| {
                                names.push(k.clone());
                                guesses.push(Guess::default());
                                names.len() - 1
                            });
                            guesses[i].json(v);
                        }
                    }
                }
            }
            seen += 1;
            let unit = current.get_or_insert(Unit {
                start: rec.start,
                end: rec.end,
                first_line: rec.line,
                rows: 0,
            });
            unit.rows += 1;
            unit.end = rec.end;
            if unit.rows >= UNIT_ROWS || unit.end - unit.start >= UNIT_BYTES {
                units.extend(current.take());
            }
        }
        units.extend(current.take());
        let fields: Vec<Field> = match (format, &csv) {
            (LineFormat::Text, _) => vec![Field::new("text", DataType::Utf8, true)],
            (_, Some(CsvLayout::Ucr)) => vec![
                Field::new("label", DataType::Utf8, true),
                Field::new("x", series1(), true),
            ],
            _ => names
                .iter()
                .zip(&guesses)
                .map(|(n, g)| Field::new(n, g.data_type(), true))
                .collect(),
        };
        Ok(LineFile {
            path: path.to_path_buf(),
            format,
            csv,
            schema: Arc::new(Schema::new(fields)),
            units,
        })
    }

    /// The columns (names and types) the file was found to have.
    pub(crate) fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The format.
    pub(crate) fn format(&self) -> LineFormat {
        self.format
    }

    /// The units, in file order.
    pub(crate) fn units(&self) -> &[Unit] {
        &self.units
    }

    /// Reads the columns `roots` (schema indices) of unit `unit`.
    pub(crate) fn read_unit(&self, unit: usize, roots: &[usize]) -> Result<UnitData, DataError> {
        let io = |source| DataError::Io {
            path: self.path.clone(),
            source,
        };
        let u = *self
            .units
            .get(unit)
            .ok_or_else(|| DataError::InvalidConfig {
                reason: format!(
                    "unit {unit} is out of range: {} has {} units",
                    self.path.display(),
                    self.units.len()
                ),
            })?;
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(u.start)).map_err(io)?;
        let mut bytes = Vec::with_capacity((u.end - u.start) as usize);
        file.take(u.end - u.start)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let changed = || DataError::Malformed {
            path: self.path.clone(),
            line: u.first_line,
            reason: format!(
                "the file changed since it was opened: {} records expected from this line on",
                u.rows
            ),
        };
        if bytes.len() as u64 != u.end - u.start {
            return Err(changed());
        }
        let mut builders: Vec<Builder> = roots
            .iter()
            .map(|&r| Builder::new(self.schema.field(r).data_type()))
            .collect();
        let mut problems = Vec::new();
        let mut lines = Vec::with_capacity(u.rows);
        let mut records = Records::new(
            std::io::Cursor::new(bytes),
            matches!(self.format, LineFormat::Csv(_)),
            u.first_line,
            u.start,
        );
        while let Some(rec) = records.next().map_err(io)? {
            if records.blank() {
                continue;
            }
            let row = lines.len();
            if row >= u.rows {
                return Err(changed());
            }
            lines.push(rec.line);
            let mut whole = |reason: String, builders: &mut Vec<Builder>| {
                problems.push(RowProblem {
                    row,
                    column: None,
                    reason: format!("line {}: {reason}", rec.line),
                });
                for b in builders.iter_mut() {
                    b.null();
                }
            };
            let text = match std::str::from_utf8(&records.buf) {
                Ok(t) => t,
                Err(e) => {
                    whole(format!("not UTF-8 text ({e})"), &mut builders);
                    continue;
                }
            };
            let mut cell_problems = Vec::new();
            match self.format {
                LineFormat::Text => {
                    for b in &mut builders {
                        if let Builder::Utf8(b) = b {
                            b.append_value(text);
                        }
                    }
                }
                LineFormat::Json => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(map)) => {
                        for (k, (b, &r)) in builders.iter_mut().zip(roots).enumerate() {
                            if let Err(e) = b.json(map.get(self.schema.field(r).name())) {
                                cell_problems.push((k, e));
                            }
                        }
                    }
                    Ok(other) => whole(
                        format!("{} is not a JSON object", json_kind(&other)),
                        &mut builders,
                    ),
                    Err(e) => whole(format!("malformed JSON: {e}"), &mut builders),
                },
                LineFormat::Csv(delim) => {
                    let fields = if rec.unterminated {
                        Err("a quoted field is not closed before the end of the file".into())
                    } else {
                        split_csv(text, delim)
                    };
                    match (fields, &self.csv) {
                        (Err(e), _) => whole(e, &mut builders),
                        (Ok(fields), Some(CsvLayout::Header(n))) if fields.len() != *n => whole(
                            format!("{} fields where the header has {n}", fields.len()),
                            &mut builders,
                        ),
                        (Ok(fields), Some(CsvLayout::Ucr)) => {
                            for (k, (b, &r)) in builders.iter_mut().zip(roots).enumerate() {
                                let result = if r == 0 {
                                    b.cell(fields[0].trim())
                                } else {
                                    ucr_series(b, &fields[1..])
                                };
                                if let Err(e) = result {
                                    cell_problems.push((k, e));
                                }
                            }
                        }
                        (Ok(fields), _) => {
                            for (k, (b, &r)) in builders.iter_mut().zip(roots).enumerate() {
                                if let Err(e) = b.cell(&fields[r]) {
                                    cell_problems.push((k, e));
                                }
                            }
                        }
                    }
                }
            }
            for (k, e) in cell_problems {
                problems.push(RowProblem {
                    row,
                    column: Some(k),
                    reason: format!(
                        "line {}: column '{}': {e}",
                        rec.line,
                        self.schema.field(roots[k]).name()
                    ),
                });
            }
            debug_assert!(builders.iter().all(|b| b.len() == row + 1));
        }
        if lines.len() != u.rows {
            return Err(changed());
        }
        Ok(UnitData {
            arrays: builders.iter_mut().map(Builder::finish).collect(),
            problems,
            lines,
        })
    }
}

/// Appends the numbers of a UCR-style record (after its label) as one series.
fn ucr_series(b: &mut Builder, fields: &[String]) -> Result<(), String> {
    let Builder::List1(list) = b else {
        return Err("internal: the series column of a UCR-style file is not a list".into());
    };
    for (i, f) in fields.iter().enumerate() {
        let t = f.trim();
        if t.is_empty() {
            list.values().append_null();
            continue;
        }
        match t.parse::<f32>() {
            Ok(x) => list.values().append_value(x),
            Err(_) => {
                list.append(false);
                return Err(format!("value {} is '{t}', not a number", i + 1));
            }
        }
    }
    list.append(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};

    #[test]
    fn csv_fields_unquote() {
        assert_eq!(
            split_csv("a,\"b,c\",\"d\"\"e\"", b',').unwrap(),
            ["a", "b,c", "d\"e"]
        );
        assert_eq!(split_csv("x\t\ty", b'\t').unwrap(), ["x", "", "y"]);
        assert_eq!(
            split_csv("\"multi\nline\",2", b',').unwrap(),
            ["multi\nline", "2"]
        );
        assert!(split_csv("\"open,1", b',').is_err());
    }

    #[test]
    fn units_split_on_rows_and_keep_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        let mut text = String::from("\u{feff}text,label\n");
        for i in 0..(UNIT_ROWS + 5) {
            if i == 3 {
                text.push_str("\"two\nlines\",1\n\n");
            } else {
                text.push_str(&format!("doc {i},{}\n", i % 3));
            }
        }
        std::fs::write(&path, text).unwrap();
        let f = LineFile::open(&path, LineFormat::Csv(b',')).unwrap();
        assert_eq!(f.units().len(), 2);
        assert_eq!(f.units()[0].rows, UNIT_ROWS);
        assert_eq!(f.units()[1].rows, 5);
        assert_eq!(f.schema().field(1).data_type(), &DataType::Int64);
        let u = f.read_unit(0, &[0, 1]).unwrap();
        assert!(u.problems.is_empty(), "{:?}", u.problems);
        assert_eq!(u.arrays[0].as_string::<i32>().value(3), "two\nlines");
        // Line 1 is the header; record 3 spans lines 5-6, then a blank line.
        assert_eq!(&u.lines[..5], [2, 3, 4, 5, 8]);
        let last = f.read_unit(1, &[1]).unwrap();
        assert_eq!(last.arrays[0].len(), 5);
    }

    #[test]
    fn bad_records_are_named_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"a\", \"n\": 1}\n\n{\"text\": \"b\", \"n\": 2.5}\n{\"text\": oops}\n[1]\n",
        )
        .unwrap();
        let f = LineFile::open(&path, LineFormat::Json).unwrap();
        let n = f.schema().index_of("n").unwrap();
        assert_eq!(f.schema().field(n).data_type(), &DataType::Float64);
        let u = f.read_unit(0, &[0, n]).unwrap();
        let reasons: Vec<&str> = u.problems.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(u.problems.len(), 2, "{reasons:?}");
        assert!(
            reasons[0].starts_with("line 4: malformed JSON"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("line 5: an array is not"),
            "{reasons:?}"
        );
        assert_eq!(u.arrays[0].null_count(), 2);
    }

    #[test]
    fn numeric_first_row_means_ucr_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.tsv");
        std::fs::write(&path, "1\t0.5\t1.5\n2\t2\tNaN\n").unwrap();
        let f = LineFile::open(&path, LineFormat::Csv(b'\t')).unwrap();
        assert_eq!(f.schema().field(0).name(), "label");
        let u = f.read_unit(0, &[0, 1]).unwrap();
        assert_eq!(u.arrays[0].as_string::<i32>().value(1), "2");
        let x = u.arrays[1].as_list::<i32>();
        let first = x.value(0);
        let first = first.as_primitive::<arrow::datatypes::Float32Type>();
        assert_eq!(first.values(), &[0.5, 1.5]);
        assert!(f
            .schema()
            .fields()
            .iter()
            .any(|c| c.data_type() == &series1()));
    }
}
