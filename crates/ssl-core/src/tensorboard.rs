//! TensorBoard event files, written (and read back) without TensorBoard or protobuf.
//!
//! An event file is a sequence of records: the data's length as a little-endian `u64`, the
//! masked CRC32C of those 8 bytes, the data (one serialized `tensorflow.Event` protobuf), and
//! the masked CRC32C of the data. [`EventWriter`] encodes the few fields a run needs by hand:
//! `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5,
//! session_log = 6 }`, `Summary { repeated Value value = 1 }`, `Value { tag = 1,
//! simple_value = 2 (float), image = 4 }`, `Image { height = 1, width = 2, colorspace = 3,
//! encoded_image_string = 4 }`, `SessionLog { status = 1 }`.
//!
//! The trainer writes every numeric key of every `metrics.jsonl` record here (through
//! [`crate::monitor::MetricsLog`]) under `DIR/tensorboard/`, so `tensorboard --logdir runs/`
//! shows the run; a resumed run appends a new file that starts with a `SessionLog::START` at
//! the first new step, which makes TensorBoard drop the older files' points from that step on.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::{CoreError, Result};

/// The folder of a run directory that holds its event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

// ---------------------------------------------------------------------------------------
// CRC32C (Castagnoli), by table, and TensorFlow's mask.

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82f6_3b78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C: [u32; 256] = crc32c_table();

/// CRC32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TensorFlow's masked CRC32C, stored in event records.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

// ---------------------------------------------------------------------------------------
// Protobuf encoding of the few fields used.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 0);
    varint(out, v);
}

/// An `Event` with wall time and step, and `body` (already-encoded further fields).
fn event(wall_time: f64, step: i64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    key(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    varint_field(&mut out, 2, step as u64);
    out.extend_from_slice(body);
    out
}

fn scalar_value(tag: &str, v: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 8);
    bytes_field(&mut out, 1, tag.as_bytes());
    key(&mut out, 2, 5);
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn image_value(tag: &str, png: &PngInfo, data: &[u8]) -> Vec<u8> {
    let mut image = Vec::with_capacity(data.len() + 16);
    varint_field(&mut image, 1, png.height as u64);
    varint_field(&mut image, 2, png.width as u64);
    varint_field(&mut image, 3, png.colorspace as u64);
    bytes_field(&mut image, 4, data);
    let mut out = Vec::with_capacity(image.len() + tag.len() + 8);
    bytes_field(&mut out, 1, tag.as_bytes());
    bytes_field(&mut out, 4, &image);
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Width, height and TensorBoard colour space (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) of a PNG.
struct PngInfo {
    width: u32,
    height: u32,
    colorspace: u32,
}

fn png_info(data: &[u8]) -> Option<PngInfo> {
    if data.len() < 26 || &data[..8] != b"\x89PNG\r\n\x1a\n" || &data[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(data[16..20].try_into().ok()?);
    let height = u32::from_be_bytes(data[20..24].try_into().ok()?);
    let colorspace = match data[25] {
        0 => 1,
        4 => 2,
        6 => 4,
        _ => 3,
    };
    Some(PngInfo {
        width,
        height,
        colorspace,
    })
}

fn host_name() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

// ---------------------------------------------------------------------------------------
// Writing.

/// Appends events to one new event file (`events.out.tfevents.<seconds>.<host>`).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing), never replacing an existing
    /// one, and writes its `file_version` header event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io("creating", dir, e))?;
        let wall = now();
        let base = format!("events.out.tfevents.{:010}.{}", wall as u64, host_name());
        let mut attempt = 0u32;
        let (path, file) = loop {
            let name = match attempt {
                0 => base.clone(),
                n => format!("{base}.{}.{n}", std::process::id()),
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => {
                    attempt += 1;
                }
                Err(e) => return Err(CoreError::io("creating", &path, e)),
            }
        };
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut body = Vec::new();
        bytes_field(&mut body, 3, b"brain.Event:2");
        w.record(&event(wall, 0, &body))?;
        w.flush()?;
        Ok(w)
    }

    /// A new event file in `run_dir/tensorboard`.
    pub fn for_run(run_dir: &Path) -> Result<Self> {
        Self::create(&run_dir.join(TENSORBOARD_DIR))
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&rec)
            .map_err(|e| CoreError::io("writing", &self.path, e))
    }

    /// Flushes what was written to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| CoreError::io("writing", &self.path, e))
    }

    /// Marks a restart at `step`: TensorBoard drops points of earlier files at `step` and
    /// later (a resumed run calls this with the first step it will log).
    pub fn restart_at(&mut self, step: u64) -> Result<()> {
        let mut session = Vec::new();
        varint_field(&mut session, 1, 1); // SessionLog.status = START
        let mut body = Vec::new();
        bytes_field(&mut body, 6, &session);
        self.record(&event(now(), step as i64, &body))?;
        self.flush()
    }

    /// Writes `(tag, value)` scalars at `step` in one event, then flushes.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            bytes_field(&mut summary, 1, &scalar_value(tag, v as f32));
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        bytes_field(&mut body, 5, &summary);
        self.record(&event(now(), step as i64, &body))?;
        self.flush()
    }

    /// Writes every numeric key of a `metrics.jsonl` record (all but `step`) as a scalar
    /// tagged by its key, at the record's `step` (or `step` when given).
    pub fn record_scalars(&mut self, step: u64, record: &Map<String, Value>) -> Result<()> {
        self.scalars(
            step,
            record
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x))),
        )
    }

    /// Writes a PNG image under `tag` at `step`, then flushes.
    ///
    /// # Errors
    /// When `png` is not a PNG file, or writing fails.
    pub fn image(&mut self, tag: &str, step: u64, png: &[u8]) -> Result<()> {
        let info = png_info(png).ok_or_else(|| {
            CoreError::InvalidInput(format!(
                "TensorBoard image {tag:?} at step {step} is not a PNG file"
            ))
        })?;
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &image_value(tag, &info, png));
        let mut body = Vec::new();
        bytes_field(&mut body, 5, &summary);
        self.record(&event(now(), step as i64, &body))?;
        self.flush()
    }

    /// Writes the PNG file at `png_path` under `tag` at `step`.
    pub fn image_file(&mut self, tag: &str, step: u64, png_path: &Path) -> Result<()> {
        let data = std::fs::read(png_path).map_err(|e| CoreError::io("reading", png_path, e))?;
        self.image(tag, step, &data).map_err(|e| match e {
            CoreError::InvalidInput(_) => CoreError::InvalidInput(format!(
                "{} is not a PNG file (TensorBoard image {tag:?})",
                png_path.display()
            )),
            e => e,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Reading (for tests and tools).

/// What a summary value holds.
#[derive(Debug, Clone, PartialEq)]
pub enum SummaryData {
    /// A scalar (`simple_value`).
    Scalar(f32),
    /// An encoded image.
    Image {
        /// Height in pixels.
        height: u32,
        /// Width in pixels.
        width: u32,
        /// 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA.
        colorspace: u32,
        /// The encoded (PNG) bytes.
        encoded: Vec<u8>,
    },
    /// Another kind of value (not decoded).
    Other,
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// The step.
    pub step: i64,
    /// The file version (only in a file's first event).
    pub file_version: Option<String>,
    /// `SessionLog.status` when the event is a session log (1: START).
    pub session_status: Option<u64>,
    /// The summary's values: `(tag, data)`.
    pub values: Vec<(String, SummaryData)>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// The next field: number, and its raw payload (varints as their value in `u64`).
    fn field(&mut self) -> Option<(u32, Field<'a>)> {
        let k = self.varint()?;
        let field = (k >> 3) as u32;
        let payload = match k & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().ok()?)),
            _ => return None,
        };
        Some((field, payload))
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn fields(data: &[u8]) -> Option<Vec<(u32, Field<'_>)>> {
    let mut r = Reader { data, pos: 0 };
    let mut out = Vec::new();
    while !r.done() {
        out.push(r.field()?);
    }
    Some(out)
}

fn decode_image(data: &[u8]) -> Option<SummaryData> {
    let (mut height, mut width, mut colorspace, mut encoded) = (0, 0, 0, Vec::new());
    for (f, v) in fields(data)? {
        match (f, v) {
            (1, Field::Varint(x)) => height = x as u32,
            (2, Field::Varint(x)) => width = x as u32,
            (3, Field::Varint(x)) => colorspace = x as u32,
            (4, Field::Bytes(b)) => encoded = b.to_vec(),
            _ => {}
        }
    }
    Some(SummaryData::Image {
        height,
        width,
        colorspace,
        encoded,
    })
}

fn decode_value(data: &[u8]) -> Option<(String, SummaryData)> {
    let mut tag = String::new();
    let mut value = SummaryData::Other;
    for (f, v) in fields(data)? {
        match (f, v) {
            (1, Field::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
            (2, Field::Fixed32(x)) => value = SummaryData::Scalar(f32::from_bits(x)),
            (4, Field::Bytes(b)) => value = decode_image(b)?,
            _ => {}
        }
    }
    Some((tag, value))
}

fn decode_event(data: &[u8]) -> Option<Event> {
    let mut ev = Event::default();
    for (f, v) in fields(data)? {
        match (f, v) {
            (1, Field::Fixed64(x)) => ev.wall_time = f64::from_bits(x),
            (2, Field::Varint(x)) => ev.step = x as i64,
            (3, Field::Bytes(b)) => ev.file_version = Some(String::from_utf8_lossy(b).into()),
            (5, Field::Bytes(b)) => {
                for (vf, vv) in fields(b)? {
                    if let (1, Field::Bytes(vb)) = (vf, vv) {
                        ev.values.push(decode_value(vb)?);
                    }
                }
            }
            (6, Field::Bytes(b)) => {
                for (sf, sv) in fields(b)? {
                    if let (1, Field::Varint(x)) = (sf, sv) {
                        ev.session_status = Some(x);
                    }
                }
            }
            _ => {}
        }
    }
    Some(ev)
}

/// Reads every event of an event file, checking both CRCs of every record.
///
/// # Errors
/// When the file cannot be read, a record is cut short, a CRC does not match or an event
/// cannot be decoded (the error names the file and the record's byte offset).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let data = std::fs::read(path).map_err(|e| CoreError::io("reading", path, e))?;
    let bad = |offset: usize, what: &str| {
        CoreError::InvalidInput(format!(
            "TensorBoard event file {}: record at byte {offset}: {what}",
            path.display()
        ))
    };
    let mut events = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let header = data
            .get(pos..pos + 12)
            .ok_or_else(|| bad(pos, "cut short"))?;
        let len_bytes = &header[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad(pos, "length"))?);
        let len_crc = u32::from_le_bytes(header[8..12].try_into().map_err(|_| bad(pos, "crc"))?);
        if len_crc != masked_crc32c(len_bytes) {
            return Err(bad(pos, "length CRC mismatch"));
        }
        let start = pos + 12;
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&e| e + 4 <= data.len())
            .ok_or_else(|| bad(pos, "cut short"))?;
        let body = &data[start..end];
        let crc = u32::from_le_bytes(data[end..end + 4].try_into().map_err(|_| bad(pos, "crc"))?);
        if crc != masked_crc32c(body) {
            return Err(bad(pos, "data CRC mismatch"));
        }
        events.push(decode_event(body).ok_or_else(|| bad(pos, "not an Event protobuf"))?);
        pos = end + 4;
    }
    Ok(events)
}

/// The event files of `dir` (names containing `tfevents`), sorted by name.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CoreError::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_known_values() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn writes_and_reads_back_scalars_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::for_run(dir.path()).unwrap();
        w.scalars(3, [("loss", 1.5), ("lr", 1e-4)]).unwrap();
        w.restart_at(4).unwrap();
        let png = {
            let mut p = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
            p.extend_from_slice(&7u32.to_be_bytes());
            p.extend_from_slice(&5u32.to_be_bytes());
            p.extend_from_slice(&[8, 2, 0, 0, 0]);
            p
        };
        w.image("previews", 4, &png).unwrap();
        assert!(w.image("bad", 4, b"not a png").is_err());
        let path = w.path().to_path_buf();
        drop(w);
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].step, 3);
        assert_eq!(
            events[1].values,
            [
                ("loss".to_string(), SummaryData::Scalar(1.5)),
                ("lr".to_string(), SummaryData::Scalar(1e-4))
            ]
        );
        assert_eq!((events[2].step, events[2].session_status), (4, Some(1)));
        assert_eq!(
            events[3].values,
            [(
                "previews".to_string(),
                SummaryData::Image {
                    height: 5,
                    width: 7,
                    colorspace: 3,
                    encoded: png
                }
            )]
        );
        // A second writer never replaces the first file.
        let w2 = EventWriter::for_run(dir.path()).unwrap();
        assert_ne!(w2.path(), path);
        assert_eq!(
            event_files(&dir.path().join(TENSORBOARD_DIR))
                .unwrap()
                .len(),
            2
        );
        // A flipped byte is caught by the CRC.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = read_events(&path).unwrap_err().to_string();
        assert!(e.contains("CRC"), "{e}");
    }
}
