//! `kiln register`: send an image's registration payload (SPEC.md, "API Registration
//! Schema") to the platform's API.
//!
//! The payload is checked against the spec's schema first ([`payload::validate`]), then
//! POSTed as JSON with `Authorization: Bearer TOKEN`. Timeouts, connection failures,
//! 408, 429 and 5xx answers are retried with the downloads' backoff (`KILN_HTTP_*`,
//! [`download::with_retries`]). 2xx is success; 409 is success when the image already
//! registered under that name (`GET API/NAME`) has the same content, and a failure
//! showing the difference otherwise; any other answer prints the server's message and
//! fails (exit 1). The token comes from `--token-file` or `KILN_API_TOKEN`, never from
//! the command line (where `ps` and shell histories would show it).

use crate::error::user;
use crate::host::download::{self, Failure, Policy};
use crate::image::payload;
use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The environment variable holding the API token when there is no `--token-file`.
pub const TOKEN_ENV: &str = "KILN_API_TOKEN";

/// Most of a server's answer kept for messages and comparisons.
const MAX_ANSWER: u64 = 1 << 20;

pub struct RegisterOpts {
    /// The payload file (out/NAME.json).
    pub payload: PathBuf,
    /// The collection URL the payload is POSTed to.
    pub api: String,
    pub token_file: Option<PathBuf>,
    /// Print the request instead of sending it.
    pub dry_run: bool,
}

/// How the registration ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The API accepted it (2xx, with its status).
    Registered(u16),
    /// 409, and the registered image is the same.
    AlreadyRegistered,
}

/// `kiln register PAYLOAD --api URL`.
pub fn cmd_register(o: &RegisterOpts) -> Result<()> {
    let (json, name) = read_payload(&o.payload)?;
    let body = serde_json::to_vec_pretty(&json)?;
    let token = token(o.token_file.as_deref());
    if o.dry_run {
        let auth = match &token {
            Ok(t) => format!(
                "Bearer <{} characters from {}>",
                t.len(),
                token_source(o.token_file.as_deref())
            ),
            Err(e) => format!("<no token: {e}>"),
        };
        println!("POST {}", o.api);
        println!("Authorization: {auth}");
        println!("Content-Type: application/json");
        println!();
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let token = token?;
    match register(&o.api, &token, &json, &body, &Policy::from_env())
        .with_context(|| format!("registering {name} ({}) at {}", o.payload.display(), o.api))?
    {
        Outcome::Registered(status) => println!("registered {name} at {} (HTTP {status})", o.api),
        Outcome::AlreadyRegistered => {
            println!("{name} is already registered at {} with the same content", o.api)
        }
    }
    Ok(())
}

/// Read and check a payload file; returns it and its `metadata.name`.
pub fn read_payload(path: &Path) -> Result<(Value, String)> {
    let text = std::fs::read(path).map_err(|e| user(format!("cannot read the payload {}: {e}", path.display())))?;
    let json: Value =
        serde_json::from_slice(&text).map_err(|e| user(format!("{} is not JSON: {e}", path.display())))?;
    payload::validate(&json, &path.display().to_string())?;
    let name = json["metadata"]["name"].as_str().unwrap_or_default().to_string();
    Ok((json, name))
}

fn token_source(file: Option<&Path>) -> String {
    match file {
        Some(f) => f.display().to_string(),
        None => TOKEN_ENV.to_string(),
    }
}

/// The API token: the first line of `file`, else `$KILN_API_TOKEN`.
fn token(file: Option<&Path>) -> Result<String> {
    let t = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| user(format!("cannot read the token file {}: {e}", f.display())))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        None => std::env::var(TOKEN_ENV).unwrap_or_default().trim().to_string(),
    };
    if t.is_empty() {
        return Err(user(format!(
            "no API token: put it in a file for --token-file or in ${TOKEN_ENV} (never on the command line)"
        )));
    }
    Ok(t)
}

/// POST the payload, retrying what is worth retrying; see the module docs.
pub fn register(api: &str, token: &str, json: &Value, body: &[u8], policy: &Policy) -> Result<Outcome> {
    let agent = download::agent(policy);
    let bearer = format!("Bearer {token}");
    let (status, answer) = download::with_retries(api, policy, || {
        tracing::debug!("POST {api}");
        let resp = agent
            .post(api)
            .header("Authorization", &bearer)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .send(body)
            .map_err(|e| (download::classify(e, api), false))?;
        let status = resp.status().as_u16();
        let failure = Failure::Status(status);
        if failure.transient() {
            return Err((failure, false));
        }
        Ok((status, read_answer(resp)))
    })?;
    match status {
        200..=299 => Ok(Outcome::Registered(status)),
        409 => {
            let name = json["metadata"]["name"].as_str().unwrap_or_default();
            let registered = fetch_registered(&agent, api, name, &bearer, policy)?;
            if registered.as_ref() == Some(json) {
                Ok(Outcome::AlreadyRegistered)
            } else {
                let had = match registered {
                    Some(r) => serde_json::to_string(&r).unwrap_or_default(),
                    None => "(GET API/NAME did not return it)".into(),
                };
                Err(anyhow!(
                    "{api} answered 409: `{name}` is already registered with different content ({}); registered: {had}",
                    server_message(&answer)
                ))
            }
        }
        _ => Err(anyhow!(
            "{api} refused the payload: HTTP {status}: {}",
            server_message(&answer)
        )),
    }
}

/// `GET API/NAME`: the registered image, if the API returns it as JSON.
fn fetch_registered(
    agent: &ureq::Agent,
    api: &str,
    name: &str,
    bearer: &str,
    policy: &Policy,
) -> Result<Option<Value>> {
    let url = format!("{}/{name}", api.trim_end_matches('/'));
    let (status, answer) = download::with_retries(&url, policy, || {
        let resp = agent
            .get(&url)
            .header("Authorization", bearer)
            .header("Accept", "application/json")
            .call()
            .map_err(|e| (download::classify(e, &url), false))?;
        let status = resp.status().as_u16();
        if Failure::Status(status).transient() {
            return Err((Failure::Status(status), false));
        }
        Ok((status, read_answer(resp)))
    })?;
    Ok((status == 200).then(|| serde_json::from_str(&answer).ok()).flatten())
}

fn read_answer(resp: ureq::http::Response<ureq::Body>) -> String {
    let mut s = String::new();
    let _ = resp.into_body().into_reader().take(MAX_ANSWER).read_to_string(&mut s);
    s
}

/// What the server said: a JSON answer's `message` or `error`, else the text.
fn server_message(answer: &str) -> String {
    let text = match serde_json::from_str::<Value>(answer) {
        Ok(v) => ["message", "error", "detail"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| answer.trim().to_string()),
        Err(_) => answer.trim().to_string(),
    };
    if text.is_empty() {
        "(no message)".into()
    } else {
        text.chars().take(2000).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages() {
        assert_eq!(server_message(r#"{"message": "bad arch"}"#), "bad arch");
        assert_eq!(server_message(r#"{"error": "nope"}"#), "nope");
        assert_eq!(server_message("plain text\n"), "plain text");
        assert_eq!(server_message(""), "(no message)");
    }

    #[test]
    fn token_comes_from_the_file_first_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("token");
        std::fs::write(&f, "  s3cr3t \nsecond line\n").unwrap();
        assert_eq!(token(Some(&f)).unwrap(), "s3cr3t");
        std::fs::write(&f, "\n").unwrap();
        assert_eq!(crate::error::exit_code(&token(Some(&f)).unwrap_err()), 2);
        let e = token(Some(&d.path().join("missing"))).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
