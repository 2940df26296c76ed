//! Parquet files in object storage: `s3://`, `gs://`, `az://` and `http(s)://` URLs, read by
//! ranged GETs (each footer when the source opens, a row group's column chunks when a decoding
//! worker reads it), so a data set in a bucket streams like local files do.
//!
//! The store clients are the arrow-rs `object_store` crate's; credentials, region and endpoint
//! come from the usual environment variables (`AWS_*` for S3 and S3-compatible servers,
//! `GOOGLE_*`, `AZURE_*`). The clients are async: every request runs on one shared tokio
//! runtime, and the blocking callers (the opening thread, the loader's decoding workers) wait for
//! its answer. A [`RemoteReader`] is the `parquet` crate's [`ChunkReader`] over one object, so
//! the same synchronous Arrow reader decodes local files and remote objects.

use std::future::Future;
use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as KeyPath;
use object_store::{ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::{ChunkReader, Length};

use crate::error::DataError;

/// Bytes read from the end of an object when opening it: the footer and the metadata of most
/// files fit, so a file opens with one GET (a larger footer costs one more).
const FOOTER_PREFETCH: u64 = 64 * 1024;
/// Bytes fetched at a time by a sequential read outside the ranges fetched ahead.
const READ_WINDOW: u64 = 1024 * 1024;
/// Footers fetched at once when a source of many objects opens.
const OPEN_CONCURRENCY: usize = 16;
/// Retries of a failed request (with exponential backoff) and the time they may take: a few
/// seconds for an endpoint that refuses connections, not the client's default three minutes.
const MAX_RETRIES: usize = 5;
const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `s` is a URL (`scheme://...`, scheme of two or more characters) rather than a path.
pub(crate) fn is_url(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The local path of a `file://` URL.
pub(crate) fn file_url_path(s: &str) -> Option<&str> {
    s.strip_prefix("file://")
}

/// The kinds of store a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    S3,
    Gcs,
    Azure,
    Http,
}

impl Scheme {
    fn parse(scheme: &str) -> Option<Self> {
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => Some(Self::S3),
            "gs" | "gcs" => Some(Self::Gcs),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Some(Self::Azure),
            "http" | "https" => Some(Self::Http),
            _ => None,
        }
    }

    /// What to check when a request was refused for its credentials.
    fn credentials_hint(self) -> &'static str {
        match self {
            Self::S3 => "check the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), and that they may read this bucket",
            Self::Gcs => "check the credentials: GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_APPLICATION_CREDENTIALS, and that they may read this bucket",
            Self::Azure => "check the credentials: AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY or AZURE_STORAGE_TOKEN, and that they may read this container",
            Self::Http => "the server refused the request; plain HTTP(S) URLs are read without credentials",
        }
    }

    /// What to check when a request failed otherwise (network, endpoint, configuration).
    fn setup_hint(self) -> &'static str {
        match self {
            Self::S3 => "check the endpoint and region: AWS_ENDPOINT_URL (or AWS_ENDPOINT) for an S3-compatible server, AWS_ALLOW_HTTP=true for a plain http:// endpoint (implied when AWS_ENDPOINT_URL starts with http://), AWS_REGION or AWS_DEFAULT_REGION; the credentials AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; and the network",
            Self::Gcs => "check GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_BASE_URL for an emulator, and the network",
            Self::Azure => "check AZURE_STORAGE_ACCOUNT_NAME and its key (AZURE_STORAGE_ACCOUNT_KEY), AZURE_STORAGE_ENDPOINT (with AZURE_ALLOW_HTTP=true for http://) for an emulator, and the network",
            Self::Http => "check the URL and the network",
        }
    }

    /// What to check for `error`.
    fn hint(self, error: &object_store::Error) -> String {
        let text = error.to_string();
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        if has(&["NoSuchBucket", "ContainerNotFound"]) {
            return format!(
                "the bucket (or container) does not exist: check its name; {}",
                self.setup_hint()
            );
        }
        match error {
            object_store::Error::NotFound { .. } => {
                "no such object or bucket: check the bucket (or container) and the key".into()
            }
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => self.credentials_hint().into(),
            _ if has(&[
                "401 Unauthorized",
                "403 Forbidden",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "ExpiredToken",
            ]) =>
            {
                self.credentials_hint().into()
            }
            _ if has(&["404 Not Found"]) => {
                "no such object or bucket: check the bucket (or container) and the key".into()
            }
            _ => self.setup_hint().into(),
        }
    }
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "ssl-data",
        source: message.into(),
    }
}

/// The one runtime every request runs on (two I/O threads, started on first use).
fn runtime() -> object_store::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ssl-data-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| generic(format!("cannot start the object-store I/O runtime: {e}")))
}

/// Runs `future` on the shared runtime and waits for its answer. The future runs as a task of
/// that runtime rather than under `Handle::block_on`, so a caller that is itself inside some
/// other tokio runtime waits instead of panicking.
fn block_on<T: Send + 'static>(
    future: impl Future<Output = object_store::Result<T>> + Send + 'static,
) -> object_store::Result<T> {
    let rt = runtime()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(generic(
            "the object-store request stopped without an answer (its task panicked)".into(),
        ))
    })
}

/// rustls is built without a default crypto provider (to avoid aws-lc's C build): ring is
/// installed for the process unless someone installed one already. (rustls deprecates ring's
/// provider for its lack of post-quantum key exchange; TLS 1.2/1.3 with it are as before.)
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    #[allow(deprecated)]
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A URL split into its store (`scheme://authority`) and the key (without a leading `/`).
struct UrlParts<'a> {
    scheme: Scheme,
    base: &'a str,
    key: &'a str,
}

fn split_url(url: &str) -> Result<UrlParts<'_>, DataError> {
    let invalid = |reason: String| DataError::InvalidConfig {
        reason: format!("data URL {url}: {reason}"),
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("not a URL".into()))?;
    let scheme = Scheme::parse(scheme).ok_or_else(|| {
        invalid(format!(
            "unsupported scheme '{scheme}://' (expected s3://, gs://, az://, http(s):// or a local path)"
        ))
    })?;
    let authority_len = rest.find('/').unwrap_or(rest.len());
    if authority_len == 0 {
        return Err(invalid(
            "no bucket (or host) after the scheme, as in s3://bucket/prefix/".into(),
        ));
    }
    let base = &url[..url.len() - rest.len() + authority_len];
    let key = rest[authority_len..].trim_start_matches('/');
    Ok(UrlParts { scheme, base, key })
}

/// A store client for `base` (`s3://bucket`, `https://host:port`...), configured from the
/// environment.
fn build_store(scheme: Scheme, base: &str) -> object_store::Result<Arc<dyn ObjectStore>> {
    install_crypto_provider();
    // Some clients look for a runtime while they are built.
    let _entered = runtime()?.enter();
    let retry = RetryConfig {
        max_retries: MAX_RETRIES,
        retry_timeout: RETRY_TIMEOUT,
        ..RetryConfig::default()
    };
    Ok(match scheme {
        Scheme::S3 => {
            let mut builder = AmazonS3Builder::from_env().with_url(base).with_retry(retry);
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            if endpoint.starts_with("http://") && std::env::var_os("AWS_ALLOW_HTTP").is_none() {
                builder = builder.with_allow_http(true);
            }
            Arc::new(builder.build()?)
        }
        Scheme::Gcs => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(base)
                .with_retry(retry)
                .build()?,
        ),
        Scheme::Azure => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(base)
                .with_retry(retry)
                .build()?,
        ),
        Scheme::Http => Arc::new(
            HttpBuilder::new()
                .with_url(base)
                .with_retry(retry)
                .with_client_options(
                    ClientOptions::new().with_allow_http(base.starts_with("http://")),
                )
                .build()?,
        ),
    })
}

/// One object of a remote source: where it is, its size, and the client that reads it.
#[derive(Debug)]
pub(crate) struct RemoteObject {
    /// The object's URL, for messages.
    pub(crate) url: String,
    key: KeyPath,
    size: u64,
    scheme: Scheme,
    store: Arc<dyn ObjectStore>,
}

/// A failed ranged read, kept as the cause of the `parquet` error it surfaces as.
#[derive(Debug, thiserror::Error)]
#[error("ranged GET of bytes {}..{} of {url} failed: {source} ({hint})", range.start, range.end)]
struct FetchError {
    url: String,
    range: Range<u64>,
    hint: String,
    #[source]
    source: object_store::Error,
}

impl RemoteObject {
    /// The file name without its extension (default row ids are `stem:row`).
    pub(crate) fn stem(&self) -> String {
        let name = self.key.filename().unwrap_or_default();
        match name.rsplit_once('.') {
            Some((stem, _)) if !stem.is_empty() => stem.to_string(),
            _ => name.to_string(),
        }
    }

    /// A `DataError` naming this object, what was being done and what to check.
    fn error(&self, what: String, source: object_store::Error) -> DataError {
        DataError::ObjectStore {
            url: self.url.clone(),
            what,
            hint: self.scheme.hint(&source),
            source: Box::new(source),
        }
    }

    /// One ranged GET, blocking.
    fn fetch(&self, range: Range<u64>) -> Result<Bytes, Box<FetchError>> {
        let (store, key) = (self.store.clone(), self.key.clone());
        let r = range.clone();
        block_on(async move { store.get_range(&key, r).await }).map_err(|source| {
            Box::new(FetchError {
                url: self.url.clone(),
                range,
                hint: self.scheme.hint(&source),
                source,
            })
        })
    }

    /// Several ranges at once (the client merges close ones and runs them concurrently).
    fn fetch_ranges(&self, ranges: Vec<Range<u64>>) -> object_store::Result<Vec<Bytes>> {
        let (store, key) = (self.store.clone(), self.key.clone());
        block_on(async move { store.get_ranges(&key, &ranges).await })
    }

    /// A `parquet` error met while reading this object, as a `DataError` naming its URL.
    fn parquet_error(&self, source: ParquetError) -> DataError {
        DataError::Parquet {
            path: self.url.clone().into(),
            source,
        }
    }
}

fn is_parquet_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    lower.ends_with(".parquet") || lower.ends_with(".parq")
}

/// Every object under `prefix` (a whole path segment: `data` lists `data/...`, not
/// `database`), sorted by key.
async fn list(
    store: Arc<dyn ObjectStore>,
    prefix: String,
) -> object_store::Result<Vec<ObjectMeta>> {
    let prefix = (!prefix.is_empty()).then(|| KeyPath::from(prefix.as_str()));
    let mut found: Vec<ObjectMeta> = store.list(prefix.as_ref()).try_collect().await?;
    found.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
    Ok(found)
}

/// Expands a URL into the objects it names, in key order:
///
/// * a key ending in `/` (or no key, the whole bucket): every `*.parquet` object under it;
/// * a key with glob characters (`*`, `?`, `[`): the objects whose key matches (`*` stays within
///   one path segment, `**` crosses them), listed under the key's literal leading directories;
/// * otherwise the object with that key, or, when there is none, every `*.parquet` object
///   under the key as a prefix (as a local directory would be read).
pub(crate) fn resolve_url(url: &str) -> Result<Vec<RemoteObject>, DataError> {
    let UrlParts { scheme, base, key } = split_url(url)?;
    let setup_error = |what: &str, source: object_store::Error| DataError::ObjectStore {
        url: url.to_string(),
        what: what.to_string(),
        hint: scheme.hint(&source),
        source: Box::new(source),
    };
    let store = build_store(scheme, base)
        .map_err(|e| setup_error("cannot set up the store client for", e))?;
    let object = |meta: ObjectMeta| RemoteObject {
        url: format!("{base}/{}", meta.location),
        key: meta.location,
        size: meta.size,
        scheme,
        store: store.clone(),
    };
    let listed = |prefix: String| {
        let store = store.clone();
        block_on(async move { list(store, prefix).await })
    };
    let no_files = || DataError::NoFiles {
        pattern: url.to_string(),
    };

    if let Some(first_glob) = key.find(['*', '?', '[']) {
        let dir_end = key[..first_glob].rfind('/').map_or(0, |i| i + 1);
        let pattern = glob::Pattern::new(key).map_err(|e| DataError::Glob {
            pattern: url.to_string(),
            reason: e.to_string(),
        })?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let found: Vec<RemoteObject> = listed(key[..dir_end].to_string())
            .map_err(|e| setup_error("cannot list", e))?
            .into_iter()
            .filter(|m| pattern.matches_with(m.location.as_ref(), options))
            .map(object)
            .collect();
        return if found.is_empty() {
            Err(no_files())
        } else {
            Ok(found)
        };
    }

    let parquet_under = |prefix: &str| -> Result<Vec<RemoteObject>, DataError> {
        Ok(listed(prefix.to_string())
            .map_err(|e| setup_error("cannot list", e))?
            .into_iter()
            .filter(|m| is_parquet_key(m.location.as_ref()))
            .map(object)
            .collect())
    };
    if key.is_empty() || key.ends_with('/') {
        let found = parquet_under(key)?;
        return if found.is_empty() {
            Err(no_files())
        } else {
            Ok(found)
        };
    }

    let (head_store, head_key) = (store.clone(), KeyPath::from(key));
    match block_on(async move { head_store.head(&head_key).await }) {
        Ok(meta) => Ok(vec![object(meta)]),
        Err(not_found @ object_store::Error::NotFound { .. }) => {
            // Not an object: a prefix, as `s3://bucket/data` for the objects under `data/`?
            let found = parquet_under(key)?;
            if found.is_empty() {
                Err(DataError::ObjectStore {
                    url: url.to_string(),
                    what: "cannot read".into(),
                    hint: format!(
                        "no object has the key '{key}' and no *.parquet object lies under '{key}/': check the bucket and the key"
                    ),
                    source: Box::new(not_found),
                })
            } else {
                Ok(found)
            }
        }
        Err(e) => Err(setup_error("cannot read", e)),
    }
}

/// The tail of one object (its footer), for [`load_metadata`].
fn fetch_tail(
    (object, range): (Arc<RemoteObject>, Range<u64>),
) -> BoxFuture<'static, object_store::Result<Bytes>> {
    async move {
        if range.is_empty() {
            Ok(Bytes::new())
        } else {
            object.store.get_range(&object.key, range).await
        }
    }
    .boxed()
}

/// Reads the footers of `objects` (one GET of the file's tail each, many at once) and parses
/// their metadata, in order.
pub(crate) fn load_metadata(
    objects: &[Arc<RemoteObject>],
) -> Result<Vec<ArrowReaderMetadata>, DataError> {
    let ranges: Vec<Range<u64>> = objects
        .iter()
        .map(|o| o.size.saturating_sub(FOOTER_PREFETCH)..o.size)
        .collect();
    let requests: Vec<_> = objects
        .iter()
        .zip(&ranges)
        .map(|(o, r)| (o.clone(), r.clone()))
        .collect();
    let tails: Vec<object_store::Result<Bytes>> = block_on(async move {
        Ok(futures_util::stream::iter(requests)
            .map(fetch_tail)
            .buffered(OPEN_CONCURRENCY)
            .collect()
            .await)
    })
    .map_err(|e| objects[0].error("cannot read the footer of".into(), e))?;
    let mut out = Vec::with_capacity(objects.len());
    for ((object, range), tail) in objects.iter().zip(ranges).zip(tails) {
        let tail = tail.map_err(|e| object.error("cannot read the footer of".into(), e))?;
        let reader = RemoteReader::new(object.clone(), vec![(range.start, tail)]);
        let meta = ArrowReaderMetadata::load(&reader, ArrowReaderOptions::new())
            .map_err(|e| object.parquet_error(e))?;
        out.push(meta);
    }
    Ok(out)
}

/// A reader of some row groups of `object`: the column chunks of the columns in `mask`, fetched
/// now by ranged GETs (close ranges merged, run concurrently).
pub(crate) fn row_groups_reader(
    object: &Arc<RemoteObject>,
    metadata: &ParquetMetaData,
    row_groups: &[usize],
    mask: &ProjectionMask,
) -> Result<RemoteReader, DataError> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for &g in row_groups {
        let rg = metadata.row_group(g);
        ranges.extend(
            (0..rg.num_columns())
                .filter(|&i| mask.leaf_included(i))
                .map(|i| {
                    let (start, len) = rg.column(i).byte_range();
                    start..start.saturating_add(len)
                })
                .filter(|r| !r.is_empty()),
        );
    }
    let starts: Vec<u64> = ranges.iter().map(|r| r.start).collect();
    let groups = match row_groups {
        [g] => format!("row group {g}"),
        _ => format!("row groups {row_groups:?}"),
    };
    let span = match (
        ranges.iter().map(|r| r.start).min(),
        ranges.iter().map(|r| r.end).max(),
    ) {
        (Some(a), Some(b)) => format!(" (bytes {a}..{b})"),
        _ => String::new(),
    };
    let chunks = object
        .fetch_ranges(ranges)
        .map_err(|e| object.error(format!("cannot read {groups}{span} of"), e))?;
    Ok(RemoteReader::new(
        object.clone(),
        starts.into_iter().zip(chunks).collect(),
    ))
}

/// The `parquet` crate's [`ChunkReader`] over one remote object: reads inside the ranges fetched
/// ahead (the footer, a row group's column chunks) are served from memory, any other read is a
/// ranged GET.
pub(crate) struct RemoteReader {
    object: Arc<RemoteObject>,
    /// Fetched ranges: file offset of the first byte, and the bytes.
    chunks: Vec<(u64, Bytes)>,
}

impl RemoteReader {
    fn new(object: Arc<RemoteObject>, chunks: Vec<(u64, Bytes)>) -> Self {
        Self { object, chunks }
    }

    /// The fetched bytes from `start` to the end of the range that holds it and at least
    /// `len` bytes.
    fn cached(&self, start: u64, len: u64) -> Option<Bytes> {
        self.chunks.iter().find_map(|(first, bytes)| {
            let end = first + bytes.len() as u64;
            (start >= *first && start.saturating_add(len) <= end)
                .then(|| bytes.slice((start - first) as usize..))
        })
    }
}

impl Length for RemoteReader {
    fn len(&self) -> u64 {
        self.object.size
    }
}

impl ChunkReader for RemoteReader {
    type T = RemoteRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<RemoteRead> {
        let buf = self.cached(start, 1).unwrap_or_default();
        Ok(RemoteRead {
            object: self.object.clone(),
            next: start + buf.len() as u64,
            buf,
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let len = length as u64;
        if let Some(bytes) = self.cached(start, len) {
            return Ok(bytes.slice(..length));
        }
        self.object
            .fetch(start..start.saturating_add(len))
            .map_err(|e| ParquetError::External(e))
    }
}

/// A sequential read of a remote object: the fetched bytes first, then windows of
/// [`READ_WINDOW`] bytes by ranged GETs until the end of the object.
pub(crate) struct RemoteRead {
    object: Arc<RemoteObject>,
    /// File offset of the byte after `buf`.
    next: u64,
    buf: Bytes,
}

impl Read for RemoteRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.next >= self.object.size || out.is_empty() {
                return Ok(0);
            }
            let end = self.next.saturating_add(READ_WINDOW).min(self.object.size);
            self.buf = self
                .object
                .fetch(self.next..end)
                .map_err(std::io::Error::other)?;
            self.next = end;
        }
        let n = out.len().min(self.buf.len());
        self.buf.copy_to_slice(&mut out[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://bucket/prefix/"));
        assert!(is_url("https://host/x.parquet"));
        assert!(!is_url("data/train.parquet"));
        assert!(!is_url("C://data"));
        assert!(!is_url("/abs/s3://x"));
        assert_eq!(
            file_url_path("file:///tmp/a.parquet"),
            Some("/tmp/a.parquet")
        );
    }

    #[test]
    fn urls_split_into_store_and_key() {
        let p = split_url("s3://bucket/a/b/").unwrap();
        assert_eq!(
            (p.scheme, p.base, p.key),
            (Scheme::S3, "s3://bucket", "a/b/")
        );
        let p = split_url("s3://bucket").unwrap();
        assert_eq!((p.base, p.key), ("s3://bucket", ""));
        let p = split_url("http://127.0.0.1:9000/x/y.parquet").unwrap();
        assert_eq!(
            (p.scheme, p.base, p.key),
            (Scheme::Http, "http://127.0.0.1:9000", "x/y.parquet")
        );
        let p = split_url("gs://b/k").unwrap();
        assert_eq!(p.scheme, Scheme::Gcs);
        let p = split_url("az://container/k").unwrap();
        assert_eq!(p.scheme, Scheme::Azure);
        let e = split_url("ftp://host/x").err().unwrap().to_string();
        assert!(
            e.contains("ftp://host/x") && e.contains("unsupported scheme"),
            "{e}"
        );
        let e = split_url("s3:///x").err().unwrap().to_string();
        assert!(e.contains("no bucket"), "{e}");
    }

    #[test]
    fn hints_name_the_variables_to_check() {
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "403".into(),
        };
        assert!(Scheme::S3.hint(&denied).contains("AWS_ACCESS_KEY_ID"));
        assert!(Scheme::S3
            .hint(&generic("refused".into()))
            .contains("AWS_ENDPOINT_URL"));
        assert!(Scheme::Azure
            .hint(&denied)
            .contains("AZURE_STORAGE_ACCOUNT_KEY"));
    }

    #[test]
    fn an_unreachable_server_is_an_error_naming_the_url_and_what_to_check() {
        // Port 1 on loopback: nothing listens, every connection is refused (after the few
        // retries of MAX_RETRIES).
        let url = "http://127.0.0.1:1/data/x.parquet";
        let e = resolve_url(url).err().unwrap();
        let text = e.to_string();
        assert!(matches!(e, DataError::ObjectStore { .. }), "{e:?}");
        assert!(
            text.contains(url) && text.contains("check the URL and the network"),
            "{text}"
        );
    }

    /// Ranged reads only: opening fetches the tail, a row group of one small column fetches
    /// that column's chunk, not the file (an in-process store holds the object).
    #[test]
    fn reads_fetch_the_footer_and_the_projected_chunks_only() {
        use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::file::properties::WriterProperties;

        let n = 2000;
        let values = Int64Array::from_iter_values(0..n as i64);
        let text = StringArray::from_iter_values((0..n).map(|i| format!("{i:0>200}")));
        let batch = RecordBatch::try_from_iter([
            ("v", Arc::new(values) as arrow::array::ArrayRef),
            ("t", Arc::new(text) as arrow::array::ArrayRef),
        ])
        .unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(500))
            .set_dictionary_enabled(false)
            .set_compression(parquet::basic::Compression::UNCOMPRESSED)
            .build();
        let mut bytes = Vec::new();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let size = bytes.len() as u64;
        assert!(size > 400_000, "{size}");

        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let key = KeyPath::from("d/x.parquet");
        let (s, k) = (store.clone(), key.clone());
        block_on(async move { s.put(&k, bytes.into()).await }).unwrap();
        let object = Arc::new(RemoteObject {
            url: "memory://d/x.parquet".into(),
            key,
            size,
            scheme: Scheme::S3,
            store,
        });
        let meta = load_metadata(std::slice::from_ref(&object))
            .unwrap()
            .remove(0);
        assert_eq!(meta.metadata().num_row_groups(), 4);
        let mask = ProjectionMask::roots(meta.parquet_schema(), [0]);
        let reader = row_groups_reader(&object, meta.metadata(), &[2], &mask).unwrap();
        let fetched: usize = reader.chunks.iter().map(|(_, b)| b.len()).sum();
        assert!(
            fetched > 0 && fetched < 5_000,
            "fetched {fetched} of {size} bytes"
        );
        let batches: Vec<RecordBatch> =
            ParquetRecordBatchReaderBuilder::new_with_metadata(reader, meta)
                .with_projection(mask)
                .with_row_groups(vec![2])
                .build()
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let got: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                assert_eq!(a.null_count(), 0);
                a.values().to_vec()
            })
            .collect();
        assert_eq!(got, (1000..1500).collect::<Vec<i64>>());
    }

    #[test]
    fn stems_drop_the_extension() {
        let object = |key: &str| RemoteObject {
            url: format!("s3://b/{key}"),
            key: KeyPath::from(key),
            size: 0,
            scheme: Scheme::S3,
            store: Arc::new(object_store::memory::InMemory::new()),
        };
        assert_eq!(object("a/part-0.parquet").stem(), "part-0");
        assert_eq!(object("a/noext").stem(), "noext");
    }
}
