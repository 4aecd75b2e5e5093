//! Publishing a finished image: `kiln publish` uploads a build's outputs to S3 or an
//! S3-compatible store ([`s3`]) and points the payload's `uri` at the uploaded image
//! ([`url`]); `kiln register` sends the payload to the platform's API ([`register`]).
//!
//! What `kiln publish out/NAME --to s3://BUCKET/PREFIX` uploads, each under
//! `PREFIX/<file name>`: `NAME.raw` (and `NAME.qcow2` when it was built), checked
//! against `SHA256SUMS` while they are read; then `NAME.spdx.json` and `NAME.lock` when
//! they exist (each checked against `SHA256SUMS` first), and `NAME.SHA256SUMS`: the lines
//! of `SHA256SUMS` for this image's files (an output directory may hold several images,
//! and so may a prefix); and last the payload `NAME.json`, whose `spec.uri` is
//! first set to the raw image's public URL (in `out/` too, so `kiln register` sends
//! that). The payload goes last: once it is there, everything it points to is.

pub mod register;
pub mod s3;
pub mod url;

use crate::disk::checksum::{SHA256SUMS, sum_for};
use crate::error::user;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct PublishOpts {
    /// `out/NAME` (or `out/NAME.raw`).
    pub image: PathBuf,
    /// `s3://BUCKET/PREFIX`.
    pub to: String,
    pub endpoint: Option<String>,
    /// The form of the public URL; [`url::UrlTemplate::default_for`] the endpoint if None.
    pub url: Option<url::UrlTemplate>,
    pub tuning: s3::Tuning,
    pub json: bool,
}

/// What `kiln publish` did (its `--json` output).
#[derive(Debug, serde::Serialize)]
pub struct PublishReport {
    pub name: String,
    /// The public URL of the raw image, now the payload's `spec.uri`.
    pub uri: String,
    pub objects: Vec<s3::Uploaded>,
}

/// A build's outputs, found from `out/NAME`.
struct Outputs {
    dir: PathBuf,
    name: String,
    sums: String,
}

impl Outputs {
    fn find(image: &Path) -> Result<Outputs> {
        let file = image
            .file_name()
            .ok_or_else(|| {
                user(format!(
                    "{}: expected out/NAME, the build's output prefix",
                    image.display()
                ))
            })?
            .to_string_lossy();
        let name = file.strip_suffix(".raw").unwrap_or(&file).to_string();
        let dir = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let o = Outputs {
            dir: dir.to_path_buf(),
            name,
            sums: String::new(),
        };
        for need in [o.file("raw"), o.file("json"), dir.join(SHA256SUMS)] {
            if !need.is_file() {
                return Err(user(format!(
                    "{} is missing: publish takes the output of `kiln build` (out/NAME: NAME.raw, NAME.json, SHA256SUMS)",
                    need.display()
                )));
            }
        }
        let sums = std::fs::read_to_string(dir.join(SHA256SUMS))
            .with_context(|| format!("reading {}", dir.join(SHA256SUMS).display()))?;
        Ok(Outputs { sums, ..o })
    }

    /// The `sha256sum` line of an output, as the uploaded checksum list has it.
    fn sum_line(&self, path: &Path) -> Result<String> {
        Ok(format!("{}  {}\n", self.sha256_of(path)?, file_name(path)))
    }

    fn file(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.name))
    }

    /// The sha256 SHA256SUMS gives for an output.
    fn sha256_of(&self, path: &Path) -> Result<String> {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        sum_for(&self.sums, &file).ok_or_else(|| {
            user(format!(
                "{} has no line for {file}; was it written by this build? Rebuild the image",
                self.dir.join(SHA256SUMS).display()
            ))
        })
    }
}

/// `kiln publish`.
pub fn cmd_publish(o: &PublishOpts) -> Result<()> {
    let out = Outputs::find(&o.image)?;
    let target = url::Target::parse(&o.to)?;
    let payload_path = out.file("json");
    let (mut payload, _) = register::read_payload(&payload_path)?;
    let images: Vec<(PathBuf, String)> = [out.file("raw"), out.file("qcow2")]
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| out.sha256_of(&p).map(|s| (p, s)))
        .collect::<Result<_>>()?;
    // The small outputs, as they are uploaded: each checked against SHA256SUMS, then the
    // lines of SHA256SUMS for every file of this image.
    let mut extras: Vec<(String, Vec<u8>)> = Vec::new();
    let mut sums = String::new();
    for (path, _) in &images {
        sums.push_str(&out.sum_line(path)?);
    }
    for path in [out.file("lock"), out.file("spdx.json")] {
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let want = out.sha256_of(&path)?;
        let have = crate::disk::checksum::hex(&<sha2::Sha256 as sha2::Digest>::digest(&data).into());
        if have != want {
            return Err(user(format!(
                "{} does not match its line in {} (sha256 {have}, expected {want}): it changed after the build; \
                 rebuild the image",
                path.display(),
                out.dir.join(SHA256SUMS).display()
            )));
        }
        sums.push_str(&out.sum_line(&path)?);
        extras.push((file_name(&path), data));
    }
    extras.push((format!("{}.{SHA256SUMS}", out.name), sums.into_bytes()));
    let template = o
        .url
        .clone()
        .unwrap_or_else(|| url::UrlTemplate::default_for(o.endpoint.as_deref()));

    // The runtime aws-sdk-s3 needs exists only for this command.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("publish")
        .enable_all()
        .build()
        .context("starting the async runtime for S3")?;
    let report = rt.block_on(async {
        let policy = crate::host::download::Policy::from_env();
        let store = s3::Store::connect(&target.bucket, o.endpoint.as_deref(), &policy).await?;
        let total: u64 = images
            .iter()
            .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let pb = crate::host::progress::bytes(total, "publish");
        let mut objects = Vec::new();
        for (path, sha) in &images {
            let key = target.key(&file_name(path));
            tracing::info!("uploading {} to s3://{}/{key}", path.display(), target.bucket);
            let up = store.put_large(path, &key, sha, o.tuning, &pb).await;
            objects.push(up.inspect_err(|_| pb.abandon())?);
        }
        pb.finish_and_clear();
        for (name, data) in extras {
            objects.push(store.put_small(&target.key(&name), data).await?);
        }
        let raw_key = target.key(&file_name(&out.file("raw")));
        let uri = template.url(&target.bucket, &raw_key, &store.region, store.endpoint.as_deref());
        payload["spec"]["uri"] = serde_json::Value::String(uri.clone());
        let mut json = serde_json::to_vec_pretty(&payload)?;
        json.push(b'\n');
        write_atomically(&payload_path, &json)?;
        objects.push(store.put_small(&target.key(&file_name(&payload_path)), json).await?);
        anyhow::Ok(PublishReport {
            name: out.name.clone(),
            uri,
            objects,
        })
    })?;

    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for obj in &report.objects {
            let how = if obj.already_published {
                " (already there)".to_string()
            } else if obj.parts_resumed > 0 {
                format!(" ({} parts resumed, {} sent)", obj.parts_resumed, obj.parts_sent)
            } else {
                String::new()
            };
            println!(
                "s3://{}/{}  {}{how}",
                target.bucket,
                obj.key,
                crate::host::progress::human_size(obj.size)
            );
        }
        println!("uri {}", report.uri);
        println!("payload {}", payload_path.display());
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Replace `path` with `data` through a renamed `.partial` file.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, data).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming {} into place", partial.display()))
}
