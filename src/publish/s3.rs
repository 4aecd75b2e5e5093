//! Uploads to S3 or an S3-compatible store (aws-sdk-s3): large files as resumable
//! multipart uploads with a SHA-256 checksum per part, small ones in one request.
//!
//! A large file is read once, in part order, by one blocking thread: data extents with
//! `pread`, holes not at all (a part's buffer comes zeroed from the allocator; the
//! SHA-256 of an all-hole part is computed once per size). While
//! reading, the thread feeds the whole-file SHA-256 (checked against `SHA256SUMS` before
//! the upload is completed, so a changed image never becomes a visible object) and
//! hashes each part for its `x-amz-checksum-sha256`. Up to `jobs` parts are in memory at
//! once, counting the one being read: a part takes a permit before its buffer is
//! allocated and gives it back when the store has acknowledged it, so memory is bounded
//! by `jobs × part_size` (128 MiB by default).
//!
//! Resume: a rerun finds the unfinished multipart upload of the same key
//! (ListMultipartUploads), lists its stored parts (ListParts), re-reads and re-hashes
//! each one, and skips it only if it is what kiln would send: the same size and the same
//! SHA-256 checksum, or, where the store keeps no checksum for the part, an ETag that is
//! the part's MD5. Anything else is uploaded again.
//!
//! After completion the object's composite SHA-256 (the SHA-256 of the parts' SHA-256s,
//! `-N`; S3 has no full-object SHA-256 for multipart uploads) is read back with
//! HeadObject and compared with the one computed from the parts kiln read; a store that
//! reports none is read back and hashed in full. A mismatch deletes the object and fails.

use crate::error::user;
use crate::host::download::Policy;
use anyhow::{Context, Result, anyhow};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// Default part size; with [`DEFAULT_JOBS`] parts in flight, 128 MiB of buffers.
pub const DEFAULT_PART_SIZE: u64 = 32 << 20;
/// Default number of parts in memory (read, queued or in flight) at once.
pub const DEFAULT_JOBS: usize = 4;
/// S3's smallest part (except the last).
const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's largest part.
const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// How long CompleteMultipartUpload may take to answer (S3 can take minutes for a
/// large object).
const COMPLETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Object metadata (`x-amz-meta-kiln-sha256`) holding the file's SHA-256, so a rerun can
/// tell a file is already published.
const SHA_META: &str = "kiln-sha256";

/// A connection to one bucket.
pub struct Store {
    client: Client,
    policy: Policy,
    pub bucket: String,
    pub region: String,
    pub endpoint: Option<String>,
}

/// What an upload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Uploaded {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Parts sent in this run.
    pub parts_sent: usize,
    /// Parts an earlier run had stored, checked and kept.
    pub parts_resumed: usize,
    /// The object was already there with this SHA-256: nothing was sent.
    pub already_published: bool,
}

/// Part size and parallelism of multipart uploads.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub part_size: u64,
    pub jobs: usize,
}

impl Store {
    /// Credentials and region from the standard AWS chain (environment, shared config
    /// and credentials files and their profiles, SSO, web identity, ECS and EC2 instance
    /// metadata); `endpoint` for an S3-compatible store (path-style requests, region
    /// `us-east-1` unless one is configured). Timeouts and retries follow `policy`
    /// (`KILN_HTTP_*`, as for downloads).
    pub async fn connect(bucket: &str, endpoint: Option<&str>, policy: &Policy) -> Result<Store> {
        use aws_config::{BehaviorVersion, retry::RetryConfig, timeout::TimeoutConfig};
        use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.read_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(policy.retries + 1)
            .with_initial_backoff(policy.backoff);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let shared = loader.load().await;
        let region = match (shared.region(), endpoint) {
            (Some(r), _) => r.to_string(),
            (None, Some(_)) => "us-east-1".to_string(),
            (None, None) => {
                return Err(user(
                    "no AWS region: set AWS_REGION (or `region` in ~/.aws/config for the profile)",
                ));
            }
        };
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .region(aws_sdk_s3::config::Region::new(region.clone()))
            .force_path_style(endpoint.is_some())
            // kiln sets every checksum itself (SHA-256); the SDK adds none of its own.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .build();
        Ok(Store {
            client: Client::from_conf(conf),
            policy: policy.clone(),
            bucket: bucket.to_string(),
            region,
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
        })
    }

    /// `s3://BUCKET at ENDPOINT` for messages.
    fn place(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("s3://{} at {e}", self.bucket),
            None => format!("s3://{} (AWS, {})", self.bucket, self.region),
        }
    }

    /// `map_err` for a failed request about `key`.
    fn fail<'a, E>(
        &'a self,
        what: &'a str,
        key: &'a str,
    ) -> impl FnOnce(SdkError<E, HttpResponse>) -> anyhow::Error + 'a
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        move |e| s3_error(&format!("{what} {key}"), e, &self.place(), &self.bucket)
    }

    /// Put a small file in one request with its SHA-256 checksum.
    pub async fn put_small(&self, key: &str, data: Vec<u8>) -> Result<Uploaded> {
        let digest: [u8; 32] = Sha256::digest(&data).into();
        let b64 = B64.encode(digest);
        let size = data.len() as u64;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(data))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(&b64)
            .metadata(SHA_META, hex::encode(digest))
            .send()
            .await
            .map_err(|e| s3_error(&format!("uploading {key}"), e, &self.place(), &self.bucket))?;
        if let Some(stored) = out.checksum_sha256()
            && stored != b64
        {
            anyhow::bail!(
                "{}: the store computed SHA-256 {stored} for {key}, kiln sent {b64}",
                self.place()
            );
        }
        Ok(Uploaded {
            key: key.to_string(),
            size,
            sha256: hex::encode(digest),
            parts_sent: 1,
            parts_resumed: 0,
            already_published: false,
        })
    }

    /// Upload `path` to `key` as a multipart upload (resuming an unfinished one), check
    /// what was read against `expected_sha256` before completing, and check the stored
    /// object after. `progress` advances by the bytes acknowledged or resumed.
    pub async fn put_large(
        &self,
        path: &Path,
        key: &str,
        expected_sha256: &str,
        tuning: Tuning,
        progress: &ProgressBar,
    ) -> Result<Uploaded> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        anyhow::ensure!(size > 0, "{} is empty", path.display());
        let place = self.place();

        // An unfinished upload of this key (the newest), and what it holds.
        let uploads = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .await
            .map_err(self.fail("looking for an unfinished upload of", key))?;
        let unfinished = uploads
            .uploads()
            .iter()
            .filter(|u| u.key() == Some(key))
            .max_by_key(|u| u.initiated().map(|t| (t.secs(), t.subsec_nanos())))
            .and_then(|u| u.upload_id().map(str::to_string));

        // Already published with this content: nothing to do.
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(h)
                if unfinished.is_none()
                    && h.content_length() == Some(size as i64)
                    && h.metadata().and_then(|m| m.get(SHA_META)).map(String::as_str) == Some(expected_sha256) =>
            {
                tracing::info!("{key} is already published with sha256 {expected_sha256}; not sent again");
                progress.inc(size);
                return Ok(Uploaded {
                    key: key.to_string(),
                    size,
                    sha256: expected_sha256.to_string(),
                    parts_sent: 0,
                    parts_resumed: 0,
                    already_published: true,
                });
            }
            Ok(_) => {}
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {}
            Err(e) => return Err(self.fail("checking", key)(e)),
        }

        let mut part_size = part_size_for(size, tuning.part_size)?;
        let (upload_id, stored) = match unfinished {
            Some(id) => {
                let stored = self.stored_parts(key, &id).await?;
                if let Some(s) = implied_part_size(&stored, size)
                    && s != part_size
                {
                    tracing::info!(
                        "the unfinished upload uses {} parts; continuing with that size",
                        crate::host::progress::human_size(s)
                    );
                    part_size = s;
                }
                tracing::info!("resuming the upload of {key}: the store holds {} parts", stored.len());
                (id, stored)
            }
            None => {
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .checksum_type(ChecksumType::Composite)
                    .metadata(SHA_META, expected_sha256)
                    .send()
                    .await
                    .map_err(self.fail("starting the upload of", key))?;
                let id = out
                    .upload_id()
                    .ok_or_else(|| anyhow!("{place}: CreateMultipartUpload of {key} returned no upload id"))?;
                (id.to_string(), HashMap::new())
            }
        };

        let ctx = Arc::new(PartCtx {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: upload_id.clone(),
            place: place.clone(),
        });
        let started = std::time::Instant::now();
        let (read, mut parts, sent, resumed) = upload_parts(file, size, part_size, tuning.jobs, stored, ctx, progress)
            .await
            .with_context(|| {
                format!(
                    "uploading {} to {key} (rerun the same command to resume)",
                    path.display()
                )
            })?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            "{key}: {} in {secs:.1} s ({}/s), {sent} parts sent, {resumed} resumed",
            crate::host::progress::human_size(size),
            crate::host::progress::human_size((size as f64 / secs.max(0.001)) as u64)
        );

        let read_hex = hex::encode(read.full);
        if read_hex != expected_sha256 {
            anyhow::bail!(
                "{} changed since its SHA256SUMS entry was written: read sha256 {read_hex}, SHA256SUMS says {expected_sha256}; the upload was not completed (no object is visible); rebuild the image",
                path.display()
            );
        }

        parts.sort_by_key(|p| p.part_number());
        // Assembling a large object takes the store a while before it answers.
        let patient = aws_sdk_s3::config::Builder::default().timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(self.policy.connect_timeout)
                .read_timeout(self.policy.read_timeout.max(COMPLETE_TIMEOUT))
                .build(),
        );
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .customize()
            .config_override(patient)
            .send()
            .await;
        match completed {
            Ok(_) => {}
            // A retried completion whose first attempt went through: the check below
            // decides.
            Err(e) if e.code() == Some("NoSuchUpload") => {
                tracing::warn!("{key}: the upload is no longer there to complete; checking the stored object")
            }
            Err(e) => return Err(self.fail("completing the upload of", key)(e)),
        }

        self.check_stored(key, size, &read).await?;
        Ok(Uploaded {
            key: key.to_string(),
            size,
            sha256: read_hex,
            parts_sent: sent,
            parts_resumed: resumed,
            already_published: false,
        })
    }

    /// The parts an unfinished upload holds, by part number.
    async fn stored_parts(&self, key: &str, upload_id: &str) -> Result<HashMap<i32, StoredPart>> {
        let mut parts = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.take())
                .send()
                .await
                .map_err(|e| {
                    s3_error(
                        &format!("listing the stored parts of {key}"),
                        e,
                        &self.place(),
                        &self.bucket,
                    )
                })?;
            for p in out.parts() {
                if let (Some(n), Some(size)) = (p.part_number(), p.size()) {
                    parts.insert(
                        n,
                        StoredPart {
                            size: size as u64,
                            etag: p.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                            sha256: p.checksum_sha256().map(str::to_string),
                        },
                    );
                }
            }
            if out.is_truncated() == Some(true)
                && let Some(m) = out.next_part_number_marker()
            {
                marker = Some(m.to_string());
            } else {
                return Ok(parts);
            }
        }
    }

    /// Compare the stored object with what was read; delete it and fail on mismatch.
    async fn check_stored(&self, key: &str, size: u64, read: &ReadResult) -> Result<()> {
        let place = self.place();
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| s3_error(&format!("checking the stored {key}"), e, &place, &self.bucket))?;
        let mut concat = Vec::with_capacity(32 * read.parts.len());
        for p in &read.parts {
            concat.extend_from_slice(p);
        }
        let composite = B64.encode(Sha256::digest(&concat));
        let n = read.parts.len().to_string();
        // `BASE64-N` as S3 documents it; some stores and SDK versions leave off `-N`.
        let same = |c: &str| match c.split_once('-') {
            Some((b, count)) => b == composite && count == n,
            None => c == composite,
        };
        let problem = if head.content_length() != Some(size as i64) {
            Some(format!(
                "it has {:?} bytes, the image {size}",
                head.content_length().unwrap_or_default()
            ))
        } else {
            match head.checksum_sha256() {
                Some(c) if same(c) => {
                    tracing::info!("{key}: the stored object's composite SHA-256 {c} matches");
                    None
                }
                Some(c) => Some(format!("the store's composite SHA-256 is {c}, kiln's {composite}-{n}")),
                None => {
                    tracing::warn!("{place} reports no SHA-256 for {key}; reading it back to check it");
                    let got = self.hash_object(key).await?;
                    (got != read.full).then(|| {
                        format!(
                            "its bytes hash to {}, the image to {}",
                            hex::encode(got),
                            hex::encode(read.full)
                        )
                    })
                }
            }
        };
        if let Some(problem) = problem {
            let deleted = self.client.delete_object().bucket(&self.bucket).key(key).send().await;
            let what = match deleted {
                Ok(_) => "kiln deleted it".to_string(),
                Err(e) => format!(
                    "deleting it failed too ({}); delete it by hand",
                    DisplayErrorContext(&e)
                ),
            };
            anyhow::bail!("the object {key} stored in {place} is not the image: {problem}; {what}; rerun kiln publish");
        }
        Ok(())
    }

    /// SHA-256 of a stored object, streamed.
    async fn hash_object(&self, key: &str) -> Result<[u8; 32]> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(&format!("reading back {key}"), e, &self.place(), &self.bucket))?;
        let mut body = out.body;
        let mut h = Sha256::new();
        while let Some(chunk) = body.try_next().await.with_context(|| format!("reading back {key}"))? {
            h.update(&chunk);
        }
        Ok(h.finalize().into())
    }
}

/// The part size for a file of `size` bytes: `wanted`, raised to S3's minimum and to
/// what keeps the upload within 10 000 parts (whole MiB).
pub fn part_size_for(size: u64, wanted: u64) -> Result<u64> {
    let for_count = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    let s = wanted.max(MIN_PART_SIZE).max(for_count);
    if s > MAX_PART_SIZE {
        return Err(user(format!(
            "a part size of {} is more than S3's 5 GiB limit",
            crate::host::progress::human_size(s)
        )));
    }
    Ok(s)
}

/// The part size an unfinished upload was made with: the size of its lowest-numbered
/// stored part that is not the file's last.
fn implied_part_size(stored: &HashMap<i32, StoredPart>, size: u64) -> Option<u64> {
    let (n, p) = stored.iter().min_by_key(|(n, _)| **n)?;
    let s = p.size;
    let last = size.div_ceil(s.max(1)) as i32;
    (s >= MIN_PART_SIZE && *n < last && size.div_ceil(s) <= MAX_PARTS).then_some(s)
}

/// A part an earlier run stored.
#[derive(Debug, Clone)]
struct StoredPart {
    size: u64,
    /// Without quotes.
    etag: String,
    /// Base64, when the store keeps per-part checksums.
    sha256: Option<String>,
}

impl StoredPart {
    /// Is this stored part exactly `data` (whose SHA-256 is `sha`)?
    fn holds(&self, data: &[u8], sha: &[u8; 32]) -> bool {
        if self.size != data.len() as u64 {
            return false;
        }
        match &self.sha256 {
            Some(s) => *s == B64.encode(sha),
            // Without a stored checksum: a plain part's ETag is its MD5.
            None => self.etag.eq_ignore_ascii_case(&hex::encode(md5::Md5::digest(data))),
        }
    }
}

/// What the reader computed.
struct ReadResult {
    /// SHA-256 of the whole file.
    full: [u8; 32],
    /// SHA-256 of each part, in order.
    parts: Vec<[u8; 32]>,
}

/// The upload one part needs.
struct PartCtx {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    place: String,
}

/// From the reader to the uploader.
enum Msg {
    /// Send this part. The permit bounds the parts in memory.
    Send {
        number: i32,
        data: Vec<u8>,
        sha: [u8; 32],
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// The store already holds this part as it is.
    Stored {
        number: i32,
        len: u64,
        sha: [u8; 32],
        etag: String,
    },
}

/// Read the file part by part (see the module docs) and upload the parts the store does
/// not hold, `jobs` at a time. Returns the hashes, the completed parts and how many were
/// sent and resumed.
async fn upload_parts(
    file: File,
    size: u64,
    part_size: u64,
    jobs: usize,
    stored: HashMap<i32, StoredPart>,
    ctx: Arc<PartCtx>,
    progress: &ProgressBar,
) -> Result<(ReadResult, Vec<CompletedPart>, usize, usize)> {
    let jobs = jobs.max(1);
    let sem = Arc::new(Semaphore::new(jobs));
    let (tx, mut rx) = mpsc::channel::<Msg>(jobs);
    let handle = tokio::runtime::Handle::current();
    let reader_sem = sem.clone();
    let reader =
        tokio::task::spawn_blocking(move || read_parts(&file, size, part_size, &stored, &tx, &reader_sem, &handle));

    let mut done = Vec::new();
    let (mut sent, mut resumed) = (0, 0);
    let mut tasks = tokio::task::JoinSet::new();
    let result: Result<()> = async {
        let mut reading = true;
        while reading || !tasks.is_empty() {
            tokio::select! {
                msg = rx.recv(), if reading => match msg {
                    Some(Msg::Send { number, data, sha, permit }) => {
                        let ctx = ctx.clone();
                        tasks.spawn(async move {
                            let len = data.len() as u64;
                            let r = put_part(&ctx, number, data, &sha).await;
                            drop(permit);
                            r.map(|p| (p, len))
                        });
                    }
                    Some(Msg::Stored { number, len, sha, etag }) => {
                        done.push(completed(number, &sha, &etag));
                        resumed += 1;
                        progress.inc(len);
                    }
                    None => reading = false,
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let (part, len) = joined.context("an upload task panicked")??;
                    done.push(part);
                    sent += 1;
                    progress.inc(len);
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        // Stop the reader (it waits for a permit or for room in the channel).
        sem.close();
        drop(rx);
        tasks.abort_all();
        let _ = reader.await;
        return Err(e);
    }
    let read = reader.await.context("the reader thread panicked")??;
    Ok((read, done, sent, resumed))
}

/// A part for CompleteMultipartUpload.
fn completed(number: i32, sha: &[u8; 32], etag: &str) -> CompletedPart {
    CompletedPart::builder()
        .part_number(number)
        .e_tag(etag)
        .checksum_sha256(B64.encode(sha))
        .build()
}

/// Upload one part with its SHA-256; the store must echo the same checksum if it
/// reports one.
async fn put_part(ctx: &PartCtx, number: i32, data: Vec<u8>, sha: &[u8; 32]) -> Result<CompletedPart> {
    let b64 = B64.encode(sha);
    let len = data.len() as i64;
    let out = ctx
        .client
        .upload_part()
        .bucket(&ctx.bucket)
        .key(&ctx.key)
        .upload_id(&ctx.upload_id)
        .part_number(number)
        .content_length(len)
        .body(ByteStream::from(data))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .checksum_sha256(&b64)
        // The part's SHA-256 header is signed and checked by the store; signing the
        // payload as well would hash every byte a third time.
        .customize()
        .disable_payload_signing()
        .send()
        .await
        .map_err(|e| {
            s3_error(
                &format!("uploading part {number} of {}", ctx.key),
                e,
                &ctx.place,
                &ctx.bucket,
            )
        })?;
    if let Some(stored) = out.checksum_sha256()
        && stored != b64
    {
        anyhow::bail!(
            "{}: the store computed SHA-256 {stored} for part {number} of {}, kiln sent {b64}",
            ctx.place,
            ctx.key
        );
    }
    let etag = out
        .e_tag()
        .ok_or_else(|| anyhow!("{}: no ETag for part {number} of {}", ctx.place, ctx.key))?;
    Ok(completed(number, sha, etag))
}

/// The reading thread: each part in order, holes left as the allocator's zeros.
fn read_parts(
    file: &File,
    size: u64,
    part_size: u64,
    stored: &HashMap<i32, StoredPart>,
    tx: &mpsc::Sender<Msg>,
    sem: &Arc<Semaphore>,
    handle: &tokio::runtime::Handle,
) -> Result<ReadResult> {
    let stopped = || anyhow!("the upload stopped");
    let extents = crate::disk::sparse::data_extents(file).context("finding the data extents")?;
    let mut full = Sha256::new();
    let mut parts = Vec::new();
    let mut zero_part: Option<(usize, [u8; 32])> = None;
    let mut next = 0;
    let count = size.div_ceil(part_size);
    for i in 0..count {
        crate::host::cancel::check()?;
        let number = i as i32 + 1;
        let start = i * part_size;
        let len = part_size.min(size - start) as usize;
        let end = start + len as u64;
        let permit = handle.block_on(sem.clone().acquire_owned()).map_err(|_| stopped())?;
        // Zeroed by the allocator: holes need no I/O.
        let mut data = vec![0u8; len];
        while next < extents.len() && extents[next].0 + extents[next].1 <= start {
            next += 1;
        }
        let mut has_data = false;
        let mut j = next;
        while j < extents.len() && extents[j].0 < end {
            let (off, n) = extents[j];
            let (s, e) = (off.max(start), (off + n).min(end));
            file.read_exact_at(&mut data[(s - start) as usize..(e - start) as usize], s)
                .with_context(|| format!("reading bytes {s}..{e}"))?;
            has_data = true;
            j += 1;
        }
        full.update(&data);
        let sha: [u8; 32] = match zero_part {
            Some((l, d)) if !has_data && l == len => d,
            _ if !has_data => {
                let d = Sha256::digest(&data).into();
                zero_part = Some((len, d));
                d
            }
            _ => Sha256::digest(&data).into(),
        };
        parts.push(sha);
        let msg = match stored.get(&number) {
            Some(p) if p.holds(&data, &sha) => Msg::Stored {
                number,
                len: len as u64,
                sha,
                etag: p.etag.clone(),
            },
            Some(_) => {
                tracing::info!("stored part {number} differs from the image; sending it again");
                Msg::Send {
                    number,
                    data,
                    sha,
                    permit,
                }
            }
            None => Msg::Send {
                number,
                data,
                sha,
                permit,
            },
        };
        tx.blocking_send(msg).map_err(|_| stopped())?;
    }
    Ok(ReadResult {
        full: full.finalize().into(),
        parts,
    })
}

/// An S3 failure in words: a missing bucket and rejected credentials are the user's to
/// fix (exit 2); an endpoint that does not answer and other failures exit 1.
fn s3_error<E>(what: &str, e: SdkError<E, HttpResponse>, place: &str, bucket: &str) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = DisplayErrorContext(&e).to_string();
    match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            if detail.contains("credentials") || detail.contains("identity") {
                return user(format!(
                    "{what}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE for ~/.aws/credentials ({detail})"
                ));
            }
            anyhow!(
                "{what}: {place} does not answer or refused the connection; check --endpoint and the network ({detail})"
            )
        }
        SdkError::ServiceError(_) => {
            let code = e.code().unwrap_or("");
            let message = e.message().unwrap_or("");
            match code {
                "NoSuchBucket" => user(format!(
                    "{what}: the bucket `{bucket}` does not exist in {place}; create it or fix --to"
                )),
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "ExpiredToken"
                | "InvalidToken"
                | "InvalidClientTokenId"
                | "AuthorizationHeaderMalformed" => user(format!(
                    "{what}: {place} rejected the credentials ({code}: {message}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE"
                )),
                _ => {
                    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or_default();
                    anyhow!("{what}: {place} answered HTTP {status} {code} {message} ({detail})")
                }
            }
        }
        _ => anyhow!("{what}: {place}: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes() {
        const M: u64 = 1 << 20;
        assert_eq!(part_size_for(20 << 30, DEFAULT_PART_SIZE).unwrap(), 32 * M);
        assert_eq!(part_size_for(100 * M, M).unwrap(), 5 * M);
        // 1 TiB needs parts of at least 105 MiB to stay within 10 000 parts.
        assert_eq!(part_size_for(1 << 40, 32 * M).unwrap(), 105 * M);
        assert!(part_size_for(1 << 30, 6 << 30).is_err());
    }

    #[test]
    fn stored_parts_are_checked_by_checksum_or_md5() {
        let data = vec![7u8; 1000];
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let md5 = hex::encode(md5::Md5::digest(&data));
        let with_sha = StoredPart {
            size: 1000,
            etag: "x".into(),
            sha256: Some(B64.encode(sha)),
        };
        assert!(with_sha.holds(&data, &sha));
        let other: [u8; 32] = Sha256::digest(b"other").into();
        assert!(!with_sha.holds(&data, &other));
        let etag_only = StoredPart {
            size: 1000,
            etag: md5.to_uppercase(),
            sha256: None,
        };
        assert!(etag_only.holds(&data, &sha));
        assert!(
            !StoredPart {
                size: 999,
                ..etag_only.clone()
            }
            .holds(&data, &sha)
        );
        let mut changed = data.clone();
        changed[500] = 8;
        assert!(!etag_only.holds(&changed, &sha));
    }

    #[test]
    fn implied_part_sizes() {
        const M: u64 = 1 << 20;
        let part = |size| StoredPart {
            size,
            etag: String::new(),
            sha256: None,
        };
        let stored: HashMap<i32, StoredPart> = [(2, part(8 * M)), (3, part(8 * M))].into();
        assert_eq!(implied_part_size(&stored, 100 * M), Some(8 * M));
        // A single stored part that is the whole file says nothing.
        let whole: HashMap<i32, StoredPart> = [(1, part(6 * M))].into();
        assert_eq!(implied_part_size(&whole, 6 * M), None);
        assert_eq!(implied_part_size(&HashMap::new(), 6 * M), None);
    }
}
