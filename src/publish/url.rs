//! Where a published file is, in the two forms kiln needs: the S3 location it is
//! uploaded to (`s3://BUCKET/PREFIX`, bucket and key) and the public URL written into
//! the payload's `uri`. The URL's form (virtual-hosted, path-style, a CDN in front of
//! the bucket) is decided here and only here, by [`UrlTemplate`].

use crate::error::user;
use anyhow::Result;

/// An `s3://BUCKET/PREFIX` destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl Target {
    /// Parse `s3://BUCKET[/PREFIX]`.
    pub fn parse(s: &str) -> Result<Target> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| user(format!("--to {s}: expected s3://BUCKET/PREFIX")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(user(format!(
                "--to {s}: `{bucket}` is not an S3 bucket name (3-63 characters: a-z, 0-9, '-', '.')"
            )));
        }
        Ok(Target {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The key of `file` under the prefix.
    pub fn key(&self, file: &str) -> String {
        if self.prefix.is_empty() {
            file.to_string()
        } else {
            format!("{}/{file}", self.prefix)
        }
    }
}

/// How the public URL of an object is formed. `virtual-hosted` and `path-style` are the
/// two S3 addressing styles; anything else is a template with `{bucket}`, `{key}`,
/// `{region}` and `{endpoint}` (for example a CDN: `https://images.example.com/{key}`).
#[derive(Debug, Clone, PartialEq)]
pub enum UrlTemplate {
    /// `https://BUCKET.s3.REGION.amazonaws.com/KEY`, or `SCHEME://BUCKET.HOST/KEY` with
    /// an endpoint.
    VirtualHosted,
    /// `ENDPOINT/BUCKET/KEY` (AWS: `https://s3.REGION.amazonaws.com/BUCKET/KEY`).
    PathStyle,
    Template(String),
}

impl std::str::FromStr for UrlTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtual-hosted" => Ok(UrlTemplate::VirtualHosted),
            "path-style" => Ok(UrlTemplate::PathStyle),
            t if t.contains("{key}") && (t.starts_with("https://") || t.starts_with("http://")) => {
                Ok(UrlTemplate::Template(t.to_string()))
            }
            t => Err(format!(
                "`{t}`: expected virtual-hosted, path-style, or an http(s) URL template with {{key}} (and optionally {{bucket}}, {{region}}, {{endpoint}})"
            )),
        }
    }
}

impl UrlTemplate {
    /// The default form: virtual-hosted on AWS, path-style on another S3-compatible
    /// store (`--endpoint`), where bucket host names often do not resolve.
    pub fn default_for(endpoint: Option<&str>) -> UrlTemplate {
        match endpoint {
            None => UrlTemplate::VirtualHosted,
            Some(_) => UrlTemplate::PathStyle,
        }
    }

    /// The public URL of `key` in `bucket`.
    pub fn url(&self, bucket: &str, key: &str, region: &str, endpoint: Option<&str>) -> String {
        let aws = format!("https://s3.{region}.amazonaws.com");
        let endpoint = endpoint.unwrap_or(&aws).trim_end_matches('/');
        let key = encode_key(key);
        match self {
            UrlTemplate::VirtualHosted => {
                let (scheme, host) = endpoint.split_once("://").unwrap_or(("https", endpoint));
                format!("{scheme}://{bucket}.{host}/{key}")
            }
            UrlTemplate::PathStyle => format!("{endpoint}/{bucket}/{key}"),
            UrlTemplate::Template(t) => t
                .replace("{bucket}", bucket)
                .replace("{region}", region)
                .replace("{endpoint}", endpoint)
                .replace("{key}", &key),
        }
    }
}

/// Percent-encode a key for a URL path, keeping `/` and RFC 3986's unreserved characters.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("s3://my-bucket/images/gpu/").unwrap();
        assert_eq!(t.bucket, "my-bucket");
        assert_eq!(t.key("a.raw"), "images/gpu/a.raw");
        assert_eq!(Target::parse("s3://my-bucket").unwrap().key("a.raw"), "a.raw");
        for bad in ["my-bucket/x", "s3://", "s3://Upper/x", "s3://ab/x", "s3://-a-b/x"] {
            let e = Target::parse(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{bad}");
        }
    }

    #[test]
    fn url_forms() {
        let (b, k, r) = ("bucket", "images/ubuntu-2204-gpu-ready-nodriver.raw", "us-east-1");
        let v: UrlTemplate = "virtual-hosted".parse().unwrap();
        assert_eq!(
            v.url(b, k, r, None),
            "https://bucket.s3.us-east-1.amazonaws.com/images/ubuntu-2204-gpu-ready-nodriver.raw"
        );
        assert_eq!(
            v.url(b, k, r, Some("http://127.0.0.1:9000/")),
            "http://bucket.127.0.0.1:9000/images/ubuntu-2204-gpu-ready-nodriver.raw"
        );
        let p: UrlTemplate = "path-style".parse().unwrap();
        assert_eq!(
            p.url(b, k, r, Some("http://127.0.0.1:9000")),
            "http://127.0.0.1:9000/bucket/images/ubuntu-2204-gpu-ready-nodriver.raw"
        );
        assert_eq!(
            p.url(b, "a b+c.raw", "eu-west-1", None),
            "https://s3.eu-west-1.amazonaws.com/bucket/a%20b%2Bc.raw"
        );
        let cdn: UrlTemplate = "https://cdn.example.com/{bucket}/{key}".parse().unwrap();
        assert_eq!(cdn.url(b, "x.raw", r, None), "https://cdn.example.com/bucket/x.raw");
        assert!("https://cdn.example.com/".parse::<UrlTemplate>().is_err());
        assert!("ftp://x/{key}".parse::<UrlTemplate>().is_err());
        assert_eq!(UrlTemplate::default_for(None), UrlTemplate::VirtualHosted);
        assert_eq!(UrlTemplate::default_for(Some("http://x")), UrlTemplate::PathStyle);
    }
}
